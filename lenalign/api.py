"""The public entry point: validate, normalize the layout, dispatch, run the Function."""

from __future__ import annotations

import torch

from .backends import select_backend
from .function import SequenceLogProbsFunction
from .layout import build_layout
from .outputs import SequenceLogProbs


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    return_token_logprobs: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> SequenceLogProbs:
    """Per-sequence sum and mean of the label log-likelihoods, fused and memory-lean.

    Args:
        logits: [B, T, V] padded batch, or with ``cu_seqlens`` [N, V] / [1, N, V] packed
            tokens; float16, bfloat16, float32 or float64; any row strides (views such as
            ``logits[:, :-1]`` are not copied).
        labels: integer tensor of shape ``logits.shape[:-1]``.
        mask: optional bool or integer tensor of the labels' shape; a position counts iff
            its label != ``ignore_index`` and the mask is true there.
        ignore_index: label value that is never counted.
        shift: Hugging Face causal-LM convention: the label at position t is scored with
            the logits at t - 1 of the same sequence; first positions never count.
        cu_seqlens: [S + 1] int32/int64 boundaries of packed sequences (FlashAttention's
            varlen convention); None for a padded batch (S = B).
        return_token_logprobs: also return per-position log-probabilities.
        inplace_backward: write the gradient into the logits' own storage during the
            backward instead of a new [.., V] buffer. The logits are overwritten: do not
            use them after ``backward()``.
        backend: "triton", "torch" or "auto" (triton where the logits live on a device
            Triton supports, else the pure-PyTorch backend).

    Returns:
        SequenceLogProbs(sum [S], mean [S], count [S] int64, token_logprobs or None);
        float fields are float64 for float64 logits and float32 otherwise.

    Raises:
        ValueError: naming the argument, for wrong shapes, dtypes or devices, a label
            outside [0, V) at a counted position, or malformed ``cu_seqlens``.
    """
    if not isinstance(return_token_logprobs, bool):
        raise ValueError(
            f"return_token_logprobs: expected a bool, got {type(return_token_logprobs).__name__}"
        )
    if not isinstance(inplace_backward, bool):
        raise ValueError(
            f"inplace_backward: expected a bool, got {type(inplace_backward).__name__}"
        )
    layout = build_layout(logits, labels, mask, ignore_index, shift, cu_seqlens)
    kernels = select_backend(backend, logits.device)
    seq_sum, seq_mean, seq_count, token_logprobs = SequenceLogProbsFunction.apply(
        layout.logits3d, layout, kernels, inplace_backward
    )
    return SequenceLogProbs(
        sum=seq_sum,
        mean=seq_mean,
        count=seq_count,
        token_logprobs=token_logprobs.reshape(layout.label_shape)
        if return_token_logprobs
        else None,
    )
