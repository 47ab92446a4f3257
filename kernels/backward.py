"""Backward: the gradient of the row log-probabilities, one read and one write per row.

With p = softmax(z) = exp((z - m) - log_sum) and logprob = (z[y] - m) - log_sum,

    d logprob / d z[v] = 1[v == y] - p[v]

so the whole upstream gradient of a row folds into one coefficient c[r] (the host forms
c[r] = g_sum[s] + g_mean[s] / count[s] + g_token[r] for counted rows) and

    dL/dz[r, v] = c[r] * (1[v == y] - p[v]).

The softmax is recomputed from the saved (m, log_sum), so nothing of size [N, V] is kept between
forward and backward. The label element 1 - p[y] is formed in fp32 before the single
rounding to the logits' dtype: rounding p[y] to bf16 first would cancel it to 0 whenever
p[y] > 1 - 2**-8. Rows that are not counted get zeros without being read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import triton_dtype, vocab_block


@triton.jit
def _row_logprob_backward_kernel(
    logits_ptr,  # [B, T, V] logits of the forward, vocab stride 1
    grad_ptr,  # [B, T, V] out: dL/dlogits; may be logits_ptr itself (in-place backward)
    targets_ptr,  # [N] int64 target of each row, -1 = not counted
    row_max_ptr,  # [N] m[r] saved by the forward
    log_sum_ptr,  # [N] log_sum[r] saved by the forward
    coef_ptr,  # [N] c[r], the folded upstream gradient of the row
    seq_len,
    stride_batch,
    stride_position,
    grad_stride_batch,
    grad_stride_position,
    vocab,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    batch_index = row // seq_len
    position = row % seq_len
    grad_row_ptr = grad_ptr + batch_index * grad_stride_batch + position * grad_stride_position
    target = tl.load(targets_ptr + row)
    if target >= 0:
        row_ptr = logits_ptr + batch_index * stride_batch + position * stride_position
        row_max = tl.load(row_max_ptr + row)
        log_sum = tl.load(log_sum_ptr + row)
        coef = tl.load(coef_ptr + row)
        # each block is read before it is written, so grad_ptr == logits_ptr is safe
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < vocab
            z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
            prob = tl.exp((z - row_max) - log_sum)
            grad = coef * (tl.where(cols == target, 1.0, 0.0) - prob)
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
    else:
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty)
            tl.store(grad_row_ptr + cols, zeros, mask=cols < vocab)


def row_logprob_backward(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    coef: torch.Tensor,
    grad: torch.Tensor,
    launch: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Write dL/dlogits for all N rows into ``grad`` (shape of ``logits3d``; may be it).

    ``launch`` = (BLOCK_V, num_warps) overrides the heuristic (benchmarks/tune.py sweeps it).
    """
    batch, seq_len, vocab = logits3d.shape
    n_rows = batch * seq_len
    if n_rows == 0:
        return grad
    block, warps = launch or vocab_block(vocab, logits3d.element_size())
    _row_logprob_backward_kernel[(n_rows,)](
        logits3d,
        grad,
        targets,
        row_max,
        log_sum,
        coef,
        seq_len,
        logits3d.stride(0),
        logits3d.stride(1),
        grad.stride(0),
        grad.stride(1),
        vocab,
        ACC_DTYPE=triton_dtype(log_sum.dtype),
        BLOCK_V=block,
        num_warps=warps,
    )
    return grad
