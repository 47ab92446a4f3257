"""Direct alignment losses of a concatenated batch in TRL's layout (first half chosen,
second half rejected), from its logits or from the hidden states entering the LM head:
one kernel call over the whole batch, then ``preference_loss`` of the split pairs."""

from __future__ import annotations

from typing import Any

import torch

from .api import linear_sequence_logprobs, sequence_logprobs
from .checks import check_choice, fail
from .outputs import SequenceLogProbs
from .preference import (
    LOSS_TYPES,
    PreferenceLossOutput,
    check_logps,
    check_reference_presence,
    preference_loss,
    split_pairs,
)
from .vocab_shard import VocabShard


def preference_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    ref_logps: SequenceLogProbs | None = None,
    *,
    shift: bool = True,
    vocab_shard: VocabShard | None = None,
    backend: str = "auto",
    loss_type: str = "sigmoid",
    **loss_kwargs: Any,
) -> PreferenceLossOutput:
    """``preference_loss`` of a concatenated batch in TRL's layout, in one kernel call.

    Rows 0..B-1 hold the chosen completions and rows B..2B-1 the rejected ones, pair i
    being rows i and B + i. ``sequence_logprobs`` runs once over all 2B rows.

    Args:
        logits: [2B, T, V] policy logits; float16, bfloat16, float32 or float64.
        labels: [2B, T] integer labels; ``-100`` marks positions that never count (prompt,
            padding).
        mask: optional [2B, T] bool or integer mask of the counted positions (e.g. the
            completion mask), aligned with the labels.
        ref_logps: SequenceLogProbs of the same 2B rows under the reference model, in the
            same layout; None for "simpo".
        shift: Hugging Face causal-LM convention: the label at position t is scored with
            the logits at t - 1 (the default, as for raw ``model(...).logits``).
        vocab_shard, backend: forwarded to ``sequence_logprobs`` (vocab-parallel logits:
            ``vocab_shard``; every rank gets the same loss).
        loss_type: as in ``preference_loss``.
        **loss_kwargs: the other keyword arguments of ``preference_loss`` (beta,
            length_normalization, gamma, alpha, label_smoothing, sft_weight).

    Returns:
        PreferenceLossOutput, the loss differentiable in ``logits``.

    Raises:
        ValueError: naming the argument, for logits that are not [2B, T, V] with an even
            row count, a ``ref_logps`` of the wrong size or presence for ``loss_type``,
            and everything ``sequence_logprobs`` and ``preference_loss`` refuse.
    """
    loss_type, ref_logps = _check_pair_batch("logits", logits, "V", loss_type, ref_logps)
    policy = sequence_logprobs(
        logits, labels, mask, shift=shift, vocab_shard=vocab_shard, backend=backend
    )
    return _pair_loss(policy, ref_logps, loss_type, loss_kwargs)


def preference_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    ref_logps: SequenceLogProbs | None = None,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = True,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    chunk_rows: int | None = None,
    vocab_shard: VocabShard | None = None,
    backend: str = "auto",
    loss_type: str = "sigmoid",
    **loss_kwargs: Any,
) -> PreferenceLossOutput:
    """``preference_loss_from_logits`` from the hidden states entering the LM head.

    The policy's log-likelihoods come from ``linear_sequence_logprobs(hidden, weight,
    labels, mask, bias=bias, ...)``, so the [2B, T, V] logits never exist at once.

    Args:
        hidden: [2B, T, H] hidden states of the policy (B chosen rows, then B rejected).
        weight: [V, H] LM-head weight; ``bias``: optional [V] LM-head bias.
        labels, mask, ref_logps, shift, backend, loss_type, **loss_kwargs: as for
            ``preference_loss_from_logits``.
        logit_scale, logit_softcap, chunk_rows, vocab_shard: as for
            ``linear_sequence_logprobs`` (``weight`` and ``bias`` then this rank's rows).

    Returns:
        PreferenceLossOutput, the loss differentiable in ``hidden``, ``weight`` and
        ``bias``.

    Raises:
        ValueError: naming the argument, as ``preference_loss_from_logits`` (with
            ``hidden`` in place of the logits) and ``linear_sequence_logprobs``.
    """
    loss_type, ref_logps = _check_pair_batch("hidden", hidden, "H", loss_type, ref_logps)
    policy = linear_sequence_logprobs(
        hidden,
        weight,
        labels,
        mask,
        bias=bias,
        shift=shift,
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
        chunk_rows=chunk_rows,
        vocab_shard=vocab_shard,
        backend=backend,
    )
    return _pair_loss(policy, ref_logps, loss_type, loss_kwargs)


def _check_pair_batch(
    argument: str,
    rows: object,
    feature: str,
    loss_type: object,
    ref_logps: SequenceLogProbs | None,
) -> tuple[str, SequenceLogProbs | None]:
    """Check a [2B, T, .] batch in TRL's layout and its reference, before any kernel runs."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 3:
        got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        fail(argument, f"a [2B, T, {feature}] tensor (B chosen rows, then B rejected rows)", got)
    n_rows = rows.shape[0]
    if n_rows % 2 != 0:
        fail(argument, "an even number of rows (B chosen, then B rejected)", n_rows)
    loss_type = check_choice("loss_type", loss_type, LOSS_TYPES)
    check_reference_presence(loss_type, "ref_logps", ref_logps)
    if ref_logps is not None:
        ref_logps = check_logps("ref_logps", ref_logps)
        if ref_logps.sum.shape[0] != n_rows:
            fail("ref_logps", f"{n_rows} sequences ({argument}.shape[0])", ref_logps.sum.shape[0])
        if ref_logps.sum.device != rows.device:
            fail(
                "ref_logps",
                f"tensors on {rows.device} (the device of {argument})",
                ref_logps.sum.device,
            )
    return loss_type, ref_logps


def _pair_loss(
    policy: SequenceLogProbs,
    ref_logps: SequenceLogProbs | None,
    loss_type: str,
    loss_kwargs: dict[str, Any],
) -> PreferenceLossOutput:
    """``preference_loss`` of the 2B sequences of a TRL-layout batch, split into pairs."""
    policy_chosen, policy_rejected = split_pairs(policy)
    ref_chosen, ref_rejected = split_pairs(ref_logps) if ref_logps is not None else (None, None)
    return preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        loss_type=loss_type,
        **loss_kwargs,
    )
