"""The autograd Function behind ``sequence_logprobs``: forward and hand-written backward."""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from .layout import RowLayout, labels_to_rows, rows_to_labels


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype outputs are accumulated and reported in: fp64 for fp64 logits, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_coefficients(
    layout: RowLayout,
    seq_count: torch.Tensor,
    grad_sum: torch.Tensor | None,
    grad_mean: torch.Tensor | None,
    grad_token: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """c[r] = counted[r] * (g_sum[s] + g_mean[s] / count[s] + g_token[r]), [N] of ``dtype``.

    Folded in float64 (O(N) work) so that c[r] is rounded once, not once per term.
    """
    segment = layout.segment_ids
    coef = torch.zeros(layout.targets.shape, dtype=torch.float64, device=layout.targets.device)
    if grad_sum is not None:
        coef += grad_sum.double()[segment]
    if grad_mean is not None:
        coef += (grad_mean.double() / seq_count.clamp(min=1))[segment]
    if grad_token is not None:
        coef += labels_to_rows(grad_token.reshape(-1).double(), layout.shift)
    # uncounted rows are zeroed by the kernels; the mask here keeps c[r] honest
    return torch.where(layout.targets >= 0, coef, torch.zeros_like(coef)).to(dtype)


def sequence_outputs(
    ctx, layout: RowLayout, backend: ModuleType, row_logprob: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, mean, count, token_logprobs) of the [N] row log-probabilities, with the ctx
    settings that both Functions' forwards share; the caller saves its own tensors."""
    seq_sum, seq_count, seq_mean = backend.segment_reduce(
        row_logprob, layout.targets, layout.cu_seqlens
    )
    ctx.layout = layout
    ctx.backend = backend
    ctx.mark_non_differentiable(seq_count)
    ctx.set_materialize_grads(False)
    return seq_sum, seq_mean, seq_count, rows_to_labels(row_logprob, layout.shift)


class SequenceLogProbsFunction(torch.autograd.Function):
    """(sum [S], mean [S], count [S], token_logprobs [N]) of a RowLayout's logits.

    Differentiable in the logits through sum, mean and token_logprobs at once: the
    backward folds the three upstream gradients into one coefficient per row,

        c[r] = counted[r] * (g_sum[s] + g_mean[s] / count[s] + g_token[r]),

    and makes one pass over the logits (see kernels/backward.py for the derivation).
    """

    @staticmethod
    def forward(
        ctx,
        logits3d: torch.Tensor,
        layout: RowLayout,
        backend: ModuleType,
        inplace_backward: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        acc = accumulate_dtype(logits3d.dtype)
        row_logprob, row_max, log_sum = backend.row_logprob_forward(logits3d, layout.targets, acc)
        outputs = sequence_outputs(ctx, layout, backend, row_logprob)
        ctx.save_for_backward(logits3d, row_max, log_sum, outputs[2])
        ctx.inplace_backward = inplace_backward
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sum, grad_mean, _grad_count, grad_token):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        logits3d, row_max, log_sum, seq_count = ctx.saved_tensors
        layout: RowLayout = ctx.layout
        coef = row_coefficients(layout, seq_count, grad_sum, grad_mean, grad_token, log_sum.dtype)
        if ctx.inplace_backward:
            grad = logits3d
        else:
            grad = torch.empty(logits3d.shape, dtype=logits3d.dtype, device=logits3d.device)
        ctx.backend.row_logprob_backward(logits3d, layout.targets, row_max, log_sum, coef, grad)
        if ctx.inplace_backward:
            # the storage was rewritten behind autograd's back: make any other saved
            # use of these logits fail loudly instead of reading gradients as logits
            torch.autograd.graph.increment_version(logits3d)
        return grad, None, None, None
