"""Device helper shared by the kernels: the final cast to the output dtype."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast_to_output(x, out_ty: tl.constexpr):
    """``x.to(out_ty)`` with round-to-nearest-even, also under the Triton interpreter.

    The interpreter converts fp32 to bf16 by truncating the low 16 bits (twice the rounding error of torch's bf16
    cast). For a bf16 output the fp32 value is therefore rounded to bf16 precision first with integer arithmetic:
    add 0x7FFF plus the lowest kept bit (ties to even), then clear the 16 low bits. The result is exactly
    representable in bf16, so the final cast is exact whichever way it rounds; on a GPU (cvt.rn) the output is
    identical. Infinities stay infinite, values above the largest bf16 round to inf as RNE requires, and NaN stays
    NaN (its quiet bit is above bit 16).

    The rounded value is then reinterpreted from its high 16 bits (bf16 is the top half of fp32) instead of cast:
    the same result as any correct cast, and the interpreter's fp32 -> bf16 conversion maps subnormals wrongly
    (5e-40 becomes 5.9e-39), which a gradient at denormal magnitudes would show.
    """
    if out_ty == tl.bfloat16:
        if x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(out_ty)
