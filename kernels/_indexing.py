"""Index arithmetic shared by the elementwise Triton kernels of this folder (``@triton.jit`` helpers)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["row_chunk"]


@triton.jit
def row_chunk(D, BLOCK: tl.constexpr):
    """This program's share of a 1-D grid of ``B * cdiv(D, BLOCK)`` programs over a ``(B, D)`` tensor (a 1-D grid has
    no 65535 limit on either factor): ``(row, col, in_row, offs)`` with ``row`` the sample, ``col`` its ``BLOCK``
    int64 column indices, ``in_row = col < D`` and ``offs = row * D + col`` in int64 (``row * D`` can exceed 2**31
    for large batches of large samples)."""
    pid = tl.program_id(0)
    chunks_per_row = tl.cdiv(D, BLOCK)
    row = pid // chunks_per_row
    col = (pid % chunks_per_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_row = col < D
    offs = row.to(tl.int64) * D + col
    return row, col, in_row, offs
