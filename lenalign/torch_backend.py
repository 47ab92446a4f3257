"""Pure-PyTorch backend: the kernels' semantics for CPU and any device Triton does not run on.

Same contract as ``lenalign.kernels`` (same arguments, same outputs, same hand-written
backward), computed over the counted rows only, in chunks of at most ``CHUNK_ELEMENTS``
logits, so it never holds more than a bounded fp32 slice of the logits besides the
gradient it returns.
"""

from __future__ import annotations

import torch

# 4 Mi elements: a 16 MiB fp32 slice (a few of them alive at once while a chunk is worked on)
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(logits3d: torch.Tensor, rows: torch.Tensor):
    """Yield (batch index, step index, row ids) for chunks of ``rows`` of bounded size."""
    steps, vocab = logits3d.shape[1], logits3d.shape[2]
    chunk_rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for chunk in torch.split(rows, chunk_rows):
        yield chunk // steps, chunk % steps, chunk


def row_logprob_forward(
    logits3d: torch.Tensor, targets: torch.Tensor, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logprob [N], lse [N]) of dtype ``acc``; 0 on rows not counted."""
    n_rows = logits3d.shape[0] * logits3d.shape[1]
    logprob = torch.zeros(n_rows, dtype=acc, device=logits3d.device)
    lse = torch.zeros(n_rows, dtype=acc, device=logits3d.device)
    counted_rows = torch.nonzero(targets >= 0).flatten()
    for batch_index, step_index, rows in _row_chunks(logits3d, counted_rows):
        z = logits3d[batch_index, step_index].to(acc)
        row_lse = torch.logsumexp(z, dim=-1)
        lse[rows] = row_lse
        logprob[rows] = z.gather(1, targets[rows, None]).squeeze(1) - row_lse
    return logprob, lse


def row_logprob_backward(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """Write dL/dz = c[r] * (1[v == y] - softmax(z)[v]) into ``grad`` (may be ``logits3d``).

    See kernels/backward.py for the derivation; the label element 1 - p[y] is formed in
    ``lse.dtype`` before the one rounding to the logits' dtype.
    """
    acc = lse.dtype
    steps = logits3d.shape[1]
    counted = targets >= 0
    skipped = torch.nonzero(~counted).flatten()
    if skipped.numel():
        grad[skipped // steps, skipped % steps] = 0
    for batch_index, step_index, rows in _row_chunks(logits3d, torch.nonzero(counted).flatten()):
        z = logits3d[batch_index, step_index].to(acc)
        row_grad = torch.exp_(z - lse[rows, None]).neg_()
        row_grad.scatter_add_(1, targets[rows, None], row_grad.new_ones(rows.numel(), 1))
        row_grad.mul_(coef[rows, None])
        grad[batch_index, step_index] = row_grad.to(grad.dtype)
    return grad


def segment_reduce(
    logprob: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (sum [S], count [S] int64, mean [S]) of ``logprob`` per sequence.

    A prefix sum would lose precision and index_add_ uses atomics on GPUs; segment_reduce
    adds each segment's values in a fixed order, so results are reproducible bit for bit.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seq_sum = torch.segment_reduce(logprob, "sum", lengths=lengths, initial=0)
    # integer prefix sums are exact, so counts may use them
    counted_before = torch.nn.functional.pad((targets >= 0).cumsum(0), (1, 0))
    seq_count = counted_before[cu_seqlens[1:]] - counted_before[cu_seqlens[:-1]]
    seq_mean = torch.where(seq_count > 0, seq_sum / seq_count.clamp(min=1), 0.0)
    return seq_sum, seq_count, seq_mean
