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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (logprob [N], row_max [N], log_sum [N]) of dtype ``acc``; 0 on rows not counted.

    The logsumexp is kept as row_max + log_sum, as in kernels/forward.py, for precision.
    """
    n_rows = logits3d.shape[0] * logits3d.shape[1]
    logprob = torch.zeros(n_rows, dtype=acc, device=logits3d.device)
    row_max = torch.zeros(n_rows, dtype=acc, device=logits3d.device)
    log_sum = torch.zeros(n_rows, dtype=acc, device=logits3d.device)
    counted_rows = torch.nonzero(targets >= 0).flatten()
    for batch_index, step_index, rows in _row_chunks(logits3d, counted_rows):
        # advanced indexing copies the chunk, so it may be worked on in place
        z = logits3d[batch_index, step_index].to(acc)
        chunk_max = z.amax(dim=-1)
        # an all -inf row shifts by 0, so that -inf - -inf never makes a nan
        chunk_max = torch.where(chunk_max == float("-inf"), 0.0, chunk_max)
        shifted = z.sub_(chunk_max[:, None])
        target_shifted = shifted.gather(1, targets[rows, None]).squeeze(1)
        chunk_log_sum = shifted.exp_().sum(dim=-1).log_()
        row_max[rows] = chunk_max
        log_sum[rows] = chunk_log_sum
        logprob[rows] = target_shifted - chunk_log_sum
    return logprob, row_max, log_sum


def row_logprob_backward(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    coef: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """Write dL/dz = c[r] * (1[v == y] - softmax(z)[v]) into ``grad`` (may be ``logits3d``).

    See kernels/backward.py for the derivation; the label element 1 - p[y] is formed in
    ``log_sum.dtype`` before the one rounding to the logits' dtype.
    """
    acc = log_sum.dtype
    steps = logits3d.shape[1]
    counted = targets >= 0
    skipped = torch.nonzero(~counted).flatten()
    if skipped.numel():
        grad[skipped // steps, skipped % steps] = 0
    for batch_index, step_index, rows in _row_chunks(logits3d, torch.nonzero(counted).flatten()):
        z = logits3d[batch_index, step_index].to(acc)
        z.sub_(row_max[rows, None]).sub_(log_sum[rows, None])
        row_grad = z.exp_().neg_()
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
    if logprob.numel() == 0:  # segment_reduce rejects empty data
        seq_sum = logprob.new_zeros(lengths.shape)
    else:
        seq_sum = torch.segment_reduce(logprob, "sum", lengths=lengths, initial=0)
    # integer prefix sums are exact, so counts may use them
    counted_before = torch.nn.functional.pad((targets >= 0).cumsum(0), (1, 0))
    seq_count = counted_before[cu_seqlens[1:]] - counted_before[cu_seqlens[:-1]]
    seq_mean = torch.where(seq_count > 0, seq_sum / seq_count.clamp(min=1), 0.0)
    return seq_sum, seq_count, seq_mean
