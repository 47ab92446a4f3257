"""Eager PyTorch reference: the baseline that tests and benchmarks compare against.

This is how trainers compute sequence log-likelihoods today (TRL up to 1.13, open-instruct):
upcast the whole [.., V] logits to float32, log_softmax, gather the labels, mask, sum.
It materializes the fp32 log-softmax and lets autograd keep it for the backward.
"""

from __future__ import annotations

import torch

from .layout import accumulate_dtype, build_layout, rows_to_labels, segment_ids
from .outputs import SequenceLogProbs


def reference_sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> SequenceLogProbs:
    """Same semantics and outputs as ``sequence_logprobs``, computed the eager way.

    ``compute_dtype`` is the dtype of the log_softmax: float32 by default (float64 for
    float64 logits), float64 to get a ground truth. Token log-probabilities are always
    returned. Differentiable through ordinary autograd.
    """
    if compute_dtype is None:
        compute_dtype = accumulate_dtype(logits.dtype)
    layout = build_layout(logits, labels, mask, ignore_index, shift, cu_seqlens)
    vocab = layout.rows3d.shape[-1]
    log_probs = torch.log_softmax(layout.rows3d.to(compute_dtype), dim=-1).reshape(-1, vocab)
    counted = layout.targets >= 0
    picked = log_probs.gather(1, layout.targets.clamp(min=0)[:, None]).squeeze(1)
    row_logprob = torch.where(counted, picked, torch.zeros_like(picked))
    n_seq = layout.cu_seqlens.numel() - 1
    segment = segment_ids(layout.cu_seqlens, layout.targets.numel())
    seq_sum = torch.zeros(n_seq, dtype=compute_dtype, device=logits.device).index_add(
        0, segment, row_logprob
    )
    seq_count = torch.zeros(n_seq, dtype=torch.int64, device=logits.device).index_add(
        0, segment, counted.to(torch.int64)
    )
    seq_mean = torch.where(seq_count > 0, seq_sum / seq_count.clamp(min=1), 0.0)
    token_logprobs = rows_to_labels(row_logprob, layout.shift).reshape(layout.label_shape)
    return SequenceLogProbs(seq_sum, seq_mean, seq_count, token_logprobs)
