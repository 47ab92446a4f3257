"""The result type of :func:`lenalign.sequence_logprobs`."""

from __future__ import annotations

from typing import NamedTuple

import torch


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
    """

    sum: torch.Tensor
    mean: torch.Tensor
    count: torch.Tensor
    token_logprobs: torch.Tensor | None = None
