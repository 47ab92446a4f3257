"""The result types of :func:`lenalign.sequence_logprobs`."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenStats(NamedTuple):
    """Per-token figures of each counted position's distribution p = softmax(z), computed
    in the pass that computes the log-likelihoods (``return_token_stats=True``).

    Each field has the labels' shape and is 0 (False) where the position is not counted;
    float fields are float32 (float64 for float64 inputs). They carry no gradient: they
    are what trainers log (TRL's DPOTrainer logs them), not what they train on.

    Attributes:
        entropy: -sum_v p[v] log p[v].
        mean_logits: the mean over the vocabulary of the logits z (after the head's
            scaling and capping, for ``linear_sequence_logprobs``).
        is_top1: bool, whether the label is the argmax of z (the first one, on ties).
        log_sum_sq_probs: log sum_v p[v]**2 (the log of the collision probability).
    """

    entropy: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor
    log_sum_sq_probs: torch.Tensor


class SequenceLogProbs(NamedTuple):
    """Per-sequence log-likelihoods of the counted positions.

    S is the number of sequences: B for padded [B, T, V] logits, len(cu_seqlens) - 1 for
    packed ones. Float fields are float32 for 16- and 32-bit logits, float64 for float64.

    Attributes:
        sum: [S] sum of log p(label) over each sequence's counted positions.
        mean: [S] ``sum / count``, exactly 0 where ``count == 0``.
        count: [S] int64 number of counted positions.
        token_logprobs: None unless requested; else the labels' shape, position t holding
            log p(labels[t]) and 0 where t is not counted.
        token_stats: None unless requested; else a TokenStats.
    """

    sum: torch.Tensor
    mean: torch.Tensor
    count: torch.Tensor
    token_logprobs: torch.Tensor | None = None
    token_stats: TokenStats | None = None
