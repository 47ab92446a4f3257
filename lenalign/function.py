"""The operator behind ``sequence_logprobs``: forward, hand-written backward, registration.

``torch.ops.lenalign.sequence_logprobs`` is a registered PyTorch operator, so that
``torch.compile`` records it as one node of its graph (with the fake implementation
below telling it the outputs' shapes and dtypes) instead of breaking the graph at the
kernels' launches. Its backward is registered with it, and calls two more operators,
``row_logprob_backward`` and its in-place twin, so that the compiled backward graph
holds them as nodes too.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .backends import backend_kernels
from .layout import accumulate_dtype, labels_to_rows, rows_to_labels, segment_ids

# devices without float64 arithmetic, where the coefficients are folded in float32
NO_FLOAT64_DEVICE_TYPES = ("mps",)


def fold_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (the O(N) fold is then rounded once), else float32."""
    return torch.float32 if device.type in NO_FLOAT64_DEVICE_TYPES else torch.float64


def row_coefficients(
    targets: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_count: torch.Tensor,
    grad_sum: torch.Tensor | None,
    grad_mean: torch.Tensor | None,
    grad_token: torch.Tensor | None,
    shift: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """c[r] = counted[r] * (g_sum[s] + g_mean[s] / count[s] + g_token[r]), [N] of ``dtype``.

    Folded in float64 where the device has it (O(N) work) so that c[r] is rounded once,
    not once per term.
    """
    fold = torch.float64 if dtype == torch.float64 else fold_dtype(targets.device)
    segment = segment_ids(cu_seqlens, targets.numel())
    coef = torch.zeros(targets.shape, dtype=fold, device=targets.device)
    if grad_sum is not None:
        coef += grad_sum.to(fold)[segment]
    if grad_mean is not None:
        coef += (grad_mean.to(fold) / seq_count.clamp(min=1))[segment]
    if grad_token is not None:
        coef += labels_to_rows(grad_token.reshape(-1).to(fold), shift)
    # uncounted rows are zeroed by the kernels; the mask here keeps c[r] honest
    return torch.where(targets >= 0, coef, torch.zeros_like(coef)).to(dtype)


# the per-token statistics' dtypes, in the order of lenalign.TokenStats; None: the
# accumulate dtype
STATS_DTYPES = (None, None, torch.bool, None)


def token_stats_outputs(
    row_stats: tuple[torch.Tensor, ...] | None, like: torch.Tensor, acc: torch.dtype, shift: int
) -> tuple[torch.Tensor, ...]:
    """The four statistics moved to label positions, or four empty tensors when they were
    not asked for (an operator's outputs are tensors, never None)."""
    if row_stats is None:
        return tuple(like.new_empty(0, dtype=dtype or acc) for dtype in STATS_DTYPES)
    return tuple(rows_to_labels(values, shift) for values in row_stats)


def sequence_fake_outputs(
    like: torch.Tensor, n_rows: int, cu_seqlens: torch.Tensor, acc: torch.dtype, stats: bool
) -> tuple[torch.Tensor, ...]:
    """Empty (sum, mean, count, token_logprobs, row_max, log_sum) and the four statistics
    (of N rows with ``stats``, else of none) of the right shapes and dtypes on ``like``'s
    device: what both operators' fake implementations return."""
    n_seq = cu_seqlens.shape[0] - 1
    n_stats = n_rows if stats else 0
    return (
        like.new_empty(n_seq, dtype=acc),
        like.new_empty(n_seq, dtype=acc),
        like.new_empty(n_seq, dtype=torch.int64),
        like.new_empty(n_rows, dtype=acc),
        like.new_empty(n_rows, dtype=acc),
        like.new_empty(n_rows, dtype=acc),
        *(like.new_empty(n_stats, dtype=dtype or acc) for dtype in STATS_DTYPES),
    )


@torch.library.custom_op("lenalign::sequence_logprobs", mutates_args=())
def sequence_logprobs_op(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    cu_seqlens: torch.Tensor,
    shift: int,
    inplace_backward: bool,
    stats: bool,
    backend: str,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """(sum [S], mean [S], count [S], token_logprobs [N], row_max [N], log_sum [N],
    entropy, mean_logits, is_top1, log_sum_sq_probs): the last four [N] with ``stats``,
    else empty.

    row_max and log_sum (the two parts of each row's logsumexp) are outputs so that the
    registered backward can save them; ``sequence_logprobs`` does not return them.
    ``inplace_backward`` only tells the backward where to write.
    """
    kernels = backend_kernels(backend)
    acc = accumulate_dtype(logits3d.dtype)
    row_logprob, row_max, log_sum, *row_stats = kernels.row_logprob_forward(
        logits3d, targets, acc, stats=stats
    )
    seq_sum, seq_count, seq_mean = kernels.segment_reduce(row_logprob, targets, cu_seqlens)
    token_logprobs = rows_to_labels(row_logprob, shift)
    outputs = (seq_sum, seq_mean, seq_count, token_logprobs, row_max, log_sum)
    return *outputs, *token_stats_outputs(row_stats or None, logits3d, acc, shift)


@sequence_logprobs_op.register_fake
def _(logits3d, targets, cu_seqlens, shift, inplace_backward, stats, backend):
    acc = accumulate_dtype(logits3d.dtype)
    return sequence_fake_outputs(logits3d, targets.shape[0], cu_seqlens, acc, stats)


@torch.library.custom_op("lenalign::row_logprob_backward", mutates_args=())
def row_logprob_backward(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    coef: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """dL/dlogits [B, T, V] = c[r] * (1[v == y] - p[v]) in a new buffer (kernels/backward.py)."""
    grad = torch.empty(logits3d.shape, dtype=logits3d.dtype, device=logits3d.device)
    backend_kernels(backend).row_logprob_backward(logits3d, targets, row_max, log_sum, coef, grad)
    return grad


@row_logprob_backward.register_fake
def _(logits3d, targets, row_max, log_sum, coef, backend):
    return torch.empty(logits3d.shape, dtype=logits3d.dtype, device=logits3d.device)


@torch.library.custom_op("lenalign::row_logprob_backward_", mutates_args=("logits3d",))
def row_logprob_backward_(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    coef: torch.Tensor,
    backend: str,
) -> None:
    """``row_logprob_backward`` written over the logits themselves. Declared as mutating
    them, so their version counter moves: any other saved use of these logits then fails
    loudly instead of reading gradients as logits."""
    backend_kernels(backend).row_logprob_backward(
        logits3d, targets, row_max, log_sum, coef, logits3d
    )


def _setup_context(ctx, inputs, output) -> None:
    logits3d, targets, cu_seqlens, shift, inplace_backward, _stats, backend = inputs
    _, _, seq_count, _, row_max, log_sum, *token_stats = output
    # every tensor the backward needs goes through save_for_backward, so that
    # saved_tensors_hooks (activation offloading) see them all
    ctx.save_for_backward(logits3d, targets, cu_seqlens, row_max, log_sum, seq_count)
    ctx.mark_non_differentiable(seq_count, row_max, log_sum, *token_stats)
    ctx.shift = shift
    ctx.inplace_backward = inplace_backward
    ctx.backend = backend


def _backward(ctx, grad_sum, grad_mean, _grad_count, grad_token, *_not_differentiable):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None
    logits3d, targets, cu_seqlens, row_max, log_sum, seq_count = ctx.saved_tensors
    coef = row_coefficients(
        targets, cu_seqlens, seq_count, grad_sum, grad_mean, grad_token, ctx.shift, log_sum.dtype
    )
    if ctx.inplace_backward:
        torch.ops.lenalign.row_logprob_backward_(
            logits3d, targets, row_max, log_sum, coef, ctx.backend
        )
        grad = logits3d
    else:
        grad = torch.ops.lenalign.row_logprob_backward(
            logits3d, targets, row_max, log_sum, coef, ctx.backend
        )
    return grad, None, None, None, None, None, None


sequence_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


class SequenceLogProbsUnderFunc(torch.autograd.Function):
    """The same operator, forward and backward, as an autograd.Function.

    ``torch.func`` transforms reject the autograd wrapper that ``register_autograd``
    generates (pytorch#168393, open in torch 2.13), but accept an autograd.Function
    with ``setup_context``; ``sequence_logprobs`` takes this route only while such a
    transform is active.
    """

    @staticmethod
    def forward(*inputs):
        return torch.ops.lenalign.sequence_logprobs(*inputs)

    setup_context = staticmethod(_setup_context)
    # the backward operators have no autograd of their own, which torch.func would call
    backward = staticmethod(once_differentiable(_backward))
