"""Mixture forward noising (SPEC §3) as one Triton pass.

    m[b, i] = gamma[b] * (a0[b, i] if mask[b] else x0[b, i]) + sigma[b] * noise[b, i]

Reads x0 or a0 (only the one the mask selects: the other load is masked off, which costs no memory traffic on a
GPU), reads noise, writes m: three streams of D elements per sample. Math in the dtype of ``gamma`` (fp32, or fp64
for fp64 inputs), result stored in x0's dtype.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from ._indexing import row_chunk
from ._rounding import cast_to_output
from ._launch import INTERPRET, as_rows, check_device, elementwise_configs

__all__ = ["mixture_noise", "mixture_noise_kernel"]


@triton.jit
def mixture_noise_kernel(
    x0_ptr,  # (B, D) latent dtype, contiguous
    a0_ptr,  # (B, D) latent dtype, contiguous
    noise_ptr,  # (B, D) latent dtype, contiguous
    gamma_ptr,  # (B,) fp32 / fp64: its dtype is the math dtype
    sigma_ptr,  # (B,) same dtype as gamma
    mask_ptr,  # (B,) uint8 (a bool tensor viewed as bytes): 1 = forget component
    out_ptr,  # (B, D) output, x0's dtype
    D,  # elements per sample
    BLOCK: tl.constexpr,
):
    # 1-D grid of B * cdiv(D, BLOCK) programs; int64 offsets (see row_chunk).
    row, col, in_row, offs = row_chunk(D, BLOCK)

    acc_ty = gamma_ptr.dtype.element_ty
    gamma = tl.load(gamma_ptr + row)
    sigma = tl.load(sigma_ptr + row)
    forget = tl.load(mask_ptr + row) != 0

    # Load only the selected source: the other load is fully masked (its column limit is 0), so it issues no
    # memory transactions. (Folding the per-sample flag into the limit also avoids a vector & scalar-bool mask,
    # which the Triton interpreter cannot load with.)
    a = tl.load(a0_ptr + offs, mask=col < tl.where(forget, D, 0), other=0.0)
    x = tl.load(x0_ptr + offs, mask=col < tl.where(forget, 0, D), other=0.0)
    src = tl.where(forget, a, x).to(acc_ty)
    noise = tl.load(noise_ptr + offs, mask=in_row, other=0.0).to(acc_ty)

    m = tl.fma(gamma, src, sigma * noise)  # one rounding fewer than gamma*src + sigma*noise
    tl.store(out_ptr + offs, cast_to_output(m, out_ptr.dtype.element_ty), mask=in_row)


# On a GPU the block size is autotuned per D; the result is elementwise, so it does not depend on the choice.
_mixture_noise_tuned = None if INTERPRET else triton.autotune(elementwise_configs(triton), key=["D"])(
    mixture_noise_kernel
)


def _interpreter_block(d: int) -> int:
    # The interpreter pays ~1 ms per program instance and vectorises each one with numpy: few, large blocks.
    return min(16384, max(16, triton.next_power_of_2(d)))


def mixture_noise(x0: Tensor, a0: Tensor, noise: Tensor, gamma: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
    """``m = gamma*(a0 if mask else x0) + sigma*noise`` in one pass (SPEC §3).

    Args:
        x0, a0, noise: ``(B, ...)``, one floating dtype (fp16/bf16/fp32/fp64), any strides.
        gamma, sigma: ``(B,)`` fp32 (fp64 when the latents are fp64); the math runs in this dtype.
        mask: ``(B,)`` bool, True = forget component (a0).

    Returns:
        Contiguous tensor of x0's shape and dtype.
    """
    check_device(x0, a0, noise, gamma, sigma, mask)
    batch = x0.shape[0]
    out = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    if out.numel() == 0:
        return out
    x, a, n = as_rows(x0, batch), as_rows(a0, batch), as_rows(noise, batch)
    d = x.shape[1]
    mask_bytes = mask.reshape(-1).contiguous().view(torch.uint8)
    gamma, sigma = gamma.contiguous(), sigma.contiguous()
    args = (x, a, n, gamma, sigma, mask_bytes, out, d)
    if INTERPRET:
        block = _interpreter_block(d)
        mixture_noise_kernel[(batch * triton.cdiv(d, block),)](*args, BLOCK=block)
    else:
        _mixture_noise_tuned[lambda meta: (batch * triton.cdiv(d, meta["BLOCK"]),)](*args)
    return out
