"""Per-sequence reduction of the N row log-probabilities: sum, count and mean.

One program per sequence walks its rows [cu_seqlens[s], cu_seqlens[s + 1]) in a fixed
order, so the sums are bitwise reproducible: no floating-point atomics anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import triton_dtype

BLOCK_ROWS = 1024


@triton.jit
def _segment_reduce_kernel(
    logprob_ptr,  # [N] row log-probabilities, 0 where not counted
    targets_ptr,  # [N] int64, -1 = not counted
    cu_seqlens_ptr,  # [S + 1] int64 row boundaries
    sum_ptr,  # [S] out
    count_ptr,  # [S] out int64
    mean_ptr,  # [S] out: sum / count, 0 where count == 0
    ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    first = tl.load(cu_seqlens_ptr + seq)
    last = tl.load(cu_seqlens_ptr + seq + 1)
    total = tl.zeros((BLOCK_ROWS,), ACC_DTYPE)
    counted = tl.zeros((BLOCK_ROWS,), tl.int64)
    for start in range(first, last, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        in_seq = rows < last
        total += tl.load(logprob_ptr + rows, mask=in_seq, other=0.0)
        counted += (tl.load(targets_ptr + rows, mask=in_seq, other=-1) >= 0).to(tl.int64)
    seq_sum = tl.sum(total, axis=0)
    seq_count = tl.sum(counted, axis=0)
    tl.store(sum_ptr + seq, seq_sum)
    tl.store(count_ptr + seq, seq_count)
    divisor = tl.maximum(seq_count, 1).to(ACC_DTYPE)
    tl.store(mean_ptr + seq, tl.where(seq_count > 0, seq_sum / divisor, 0.0))


def segment_reduce(
    logprob: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (sum [S], count [S] int64, mean [S]) of ``logprob`` per sequence."""
    n_seq = cu_seqlens.numel() - 1
    seq_sum = torch.empty(n_seq, dtype=logprob.dtype, device=logprob.device)
    seq_count = torch.empty(n_seq, dtype=torch.int64, device=logprob.device)
    seq_mean = torch.empty(n_seq, dtype=logprob.dtype, device=logprob.device)
    if n_seq == 0:
        return seq_sum, seq_count, seq_mean
    _segment_reduce_kernel[(n_seq,)](
        logprob,
        targets,
        cu_seqlens,
        seq_sum,
        seq_count,
        seq_mean,
        ACC_DTYPE=triton_dtype(logprob.dtype),
        BLOCK_ROWS=BLOCK_ROWS,
    )
    return seq_sum, seq_count, seq_mean
