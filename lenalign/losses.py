"""Direct alignment losses on summed, averaged and interpolated sequence log-likelihoods.

Every loss here compares sequence scores s(y) = sum / count**lambda, the same operator
applied to policy and reference alike. lambda = 1 is the averaging operator of
"Averaging log-likelihoods in direct alignment" (Grinsztajn et al., 2024), which replaces
each log pi(y|x) by (1/|y|) log pi(y|x); lambda = 0 is the summed log-likelihood of DPO
(Rafailov et al., 2023); intermediate lambda is this package's interpolation, the exponent
of RRHF's length penalty (Yuan et al., 2023). The formulas, the normalization each
published recipe uses and typical beta ranges are in docs/losses.md.
"""

from __future__ import annotations

from numbers import Real
from typing import Any, NamedTuple

import torch
from torch.nn.functional import logsigmoid

from .api import linear_sequence_logprobs, sequence_logprobs
from .checks import check_choice, fail, finite_real
from .layout import INTEGER_DTYPES
from .outputs import SequenceLogProbs

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "rdpo", "simpo")
# the loss types that compare policy and reference; "simpo" alone scores the policy only
REFERENCE_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "rdpo")
NAMED_EXPONENTS = {"sum": 0.0, "mean": 1.0}
# each of these hyperparameters enters one loss type's formula only; a non-zero value with
# another loss type is refused rather than silently ignored
HYPERPARAMETER_OWNERS = {"gamma": "simpo", "alpha": "rdpo", "label_smoothing": "sigmoid"}


class PreferenceLossOutput(NamedTuple):
    """The loss of a batch of B preference pairs and its per-pair diagnostics.

    Float fields share one dtype: the promoted dtype of the inputs' ``sum`` fields, at
    least float32. Everything but ``loss`` is detached.

    Attributes:
        loss: [] mean over the pairs of the per-pair loss (the ``sft_weight`` term included).
        chosen_rewards: [B] beta * (s_pol(y_w) - s_ref(y_w)); beta * s_pol(y_w) for "simpo".
        rejected_rewards: [B] the same for the rejected completions.
        margins: [B] chosen_rewards - rejected_rewards.
        accuracies: [B] 1.0 where chosen_rewards > rejected_rewards, else 0.0; NaN where the
            margin is NaN, so that a broken pair is not counted as a wrong one.
        chosen_lengths: [B] the policy's token counts |y_w|, as given (int64 from
            ``sequence_logprobs``).
        rejected_lengths: [B] the policy's token counts |y_l|.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracies: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


def _length_exponent(length_normalization: object) -> float:
    """lambda of the score s(y) = sum / count**lambda from the user's argument."""
    expected = "'sum', 'mean' or a number lambda in [0, 1]"
    if isinstance(length_normalization, str):
        if length_normalization not in NAMED_EXPONENTS:
            fail("length_normalization", expected, repr(length_normalization))
        return NAMED_EXPONENTS[length_normalization]
    if isinstance(length_normalization, bool) or not isinstance(length_normalization, Real):
        fail("length_normalization", expected, type(length_normalization).__name__)
    exponent = float(length_normalization)
    # written so that NaN fails too
    if not 0.0 <= exponent <= 1.0:
        fail("length_normalization", expected, exponent)
    return exponent


def _check_reference_presence(loss_type: str, argument: str, reference: object) -> None:
    if loss_type in REFERENCE_LOSS_TYPES and reference is None:
        fail(argument, f"the reference log-probs that loss_type={loss_type!r} needs", None)
    if loss_type not in REFERENCE_LOSS_TYPES and reference is not None:
        fail(
            argument,
            f"None (loss_type={loss_type!r} is reference-free and would ignore a reference)",
            f"a {type(reference).__name__}",
        )


def _check_logps(argument: str, logps: object) -> SequenceLogProbs:
    if not isinstance(logps, SequenceLogProbs):
        fail(argument, "a SequenceLogProbs", type(logps).__name__)
    total, count = logps.sum, logps.count
    if not isinstance(total, torch.Tensor):
        fail(f"{argument}.sum", "a tensor", type(total).__name__)
    if not total.is_floating_point() or total.dim() != 1:
        got = f"shape {tuple(total.shape)} and dtype {total.dtype}"
        fail(f"{argument}.sum", "a 1-D floating-point tensor [B]", got)
    if not isinstance(count, torch.Tensor):
        fail(f"{argument}.count", "a tensor", type(count).__name__)
    if count.dtype not in INTEGER_DTYPES:
        fail(f"{argument}.count", "an integer dtype", count.dtype)
    if count.shape != total.shape:
        fail(f"{argument}.count", f"shape {tuple(total.shape)} (as .sum)", tuple(count.shape))
    if count.device != total.device:
        fail(f"{argument}.count", f"device {total.device} (as .sum)", count.device)
    return logps


def _check_pairs(named_logps: dict[str, SequenceLogProbs]) -> None:
    """Check that all log-probs describe the same B >= 1 pairs on one device."""
    (first_name, first), *others = named_logps.items()
    n_pairs, device = first.sum.shape[0], first.sum.device
    if n_pairs == 0:
        fail(first_name, "at least one sequence (one pair)", "0 sequences")
    for name, logps in others:
        if logps.sum.shape[0] != n_pairs:
            fail(name, f"{n_pairs} sequences (as {first_name})", logps.sum.shape[0])
        if logps.sum.device != device:
            fail(name, f"tensors on {device} (as {first_name})", logps.sum.device)


def _score_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # half precision cannot resolve a margin between two sums of hundreds of log-probs
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def _score(
    total: torch.Tensor, count: torch.Tensor, exponent: float, dtype: torch.dtype
) -> torch.Tensor:
    """[B] total / count**exponent in ``dtype``, differentiable in ``total``."""
    total = total.to(dtype)
    divisor = count.clamp(min=1).to(dtype)
    # pow is not correctly rounded on every device, and lambda = 1 must reproduce the
    # kernel's mean bit for bit (x**0 is exactly 1 everywhere)
    if exponent != 1.0:
        divisor = divisor.pow(exponent)
    # an empty sequence scores 0 whatever its sum holds; total * 0 instead of a literal 0
    # keeps a NaN or infinite sum visible
    return torch.where(count > 0, total / divisor, total * 0)


def sequence_score(
    logps: SequenceLogProbs, length_normalization: str | float = "mean"
) -> torch.Tensor:
    """The length-normalized sequence score that ``preference_loss`` compares.

    Args:
        logps: per-sequence log-likelihoods of S sequences (``sum`` [S] float, ``count``
            [S] integer), e.g. from ``sequence_logprobs``.
        length_normalization: "sum" (lambda = 0), "mean" (lambda = 1) or lambda in [0, 1].

    Returns:
        [S] s(y) = sum / count**lambda, 0 where count == 0 (NaN or inf where such a sum
        is), in the dtype of ``logps.sum`` promoted to at least float32; differentiable in
        ``logps.sum``.

    Raises:
        ValueError: naming the argument, for a malformed ``logps`` or a lambda outside [0, 1].
    """
    exponent = _length_exponent(length_normalization)
    logps = _check_logps("logps", logps)
    return _score(logps.sum, logps.count, exponent, _score_dtype(logps.sum.dtype))


def _check_hyperparameters(
    loss_type: str,
    beta: object,
    gamma: object,
    alpha: object,
    label_smoothing: object,
    sft_weight: object,
) -> tuple[float, float, float, float, float]:
    beta = finite_real("beta", beta)
    if beta <= 0:
        fail("beta", "a number > 0", beta)
    gamma = finite_real("gamma", gamma)
    alpha = finite_real("alpha", alpha)
    label_smoothing = finite_real("label_smoothing", label_smoothing)
    # a flip probability above 1/2 would mean the labels are more wrong than right
    if not 0.0 <= label_smoothing <= 0.5:
        fail("label_smoothing", "a probability in [0, 0.5]", label_smoothing)
    sft_weight = finite_real("sft_weight", sft_weight)
    if sft_weight < 0:
        fail("sft_weight", "a number >= 0", sft_weight)
    values = {"gamma": gamma, "alpha": alpha, "label_smoothing": label_smoothing}
    for argument, owner in HYPERPARAMETER_OWNERS.items():
        if values[argument] != 0.0 and loss_type != owner:
            fail(
                argument,
                f"0 with loss_type={loss_type!r} (it is used by loss_type={owner!r} only)",
                values[argument],
            )
    return beta, gamma, alpha, label_smoothing, sft_weight


def preference_loss(
    policy_chosen: SequenceLogProbs,
    policy_rejected: SequenceLogProbs,
    ref_chosen: SequenceLogProbs | None = None,
    ref_rejected: SequenceLogProbs | None = None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    length_normalization: str | float = "sum",
    gamma: float = 0.0,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> PreferenceLossOutput:
    """Direct alignment loss of B preference pairs (chosen y_w, rejected y_l).

    Scores are s(y) = sum / count**lambda for policy and reference alike, and
    h = (s_pol(y_w) - s_ref(y_w)) - (s_pol(y_l) - s_ref(y_l)). Per pair:

    - "sigmoid" (DPO; cDPO with eps > 0):
      -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), eps = label_smoothing
    - "ipo": (h - 1 / (2 beta))**2
    - "hinge" (SLiC): max(0, 1 - beta h)
    - "rdpo" (R-DPO): -log sigmoid(beta h + alpha (|y_w| - |y_l|)), lengths = policy counts
    - "simpo" (reference-free): -log sigmoid(beta (s_pol(y_w) - s_pol(y_l)) - gamma)

    plus ``sft_weight * -(sum_w / count_w)``, the token-mean NLL of the chosen completion.

    Args:
        policy_chosen, policy_rejected: log-likelihoods of the B chosen and B rejected
            completions under the policy (``sum`` [B] float, ``count`` [B] integer), e.g.
            from ``sequence_logprobs``; the loss is differentiable through their ``sum``.
        ref_chosen, ref_rejected: the same under the reference model (a no-grad pass or a
            cache); treated as constants. Required by every loss_type but "simpo", and
            refused by "simpo". Their own counts normalize their scores: they should equal
            the policy's (same tokens), which is not checked, to avoid a device sync.
        loss_type: "sigmoid", "ipo", "hinge", "rdpo" or "simpo".
        beta: > 0; the inverse temperature of the scores. Averaged scores are about |y|
            times smaller than summed ones, so "mean" recipes use a larger beta (1 to 10)
            than summed DPO (about 0.1).
        length_normalization: "sum" (lambda = 0), "mean" (lambda = 1, the averaged
            log-likelihood of Grinsztajn et al., 2024) or a number lambda in [0, 1]
            (this package's interpolation).
        gamma: "simpo" target margin, in the units of beta times a score.
        alpha: "rdpo" weight of the length difference; > 0 lowers the loss, and so the
            push, on pairs whose chosen completion is the longer one.
        label_smoothing: "sigmoid" probability eps in [0, 0.5] that a label is flipped.
        sft_weight: >= 0 weight of the chosen completions' token-mean NLL.

    Returns:
        PreferenceLossOutput: ``loss`` [] and detached per-pair [B] diagnostics.

    Raises:
        ValueError: naming the argument, for an unknown loss_type, lambda outside [0, 1],
            beta <= 0, a hyperparameter the loss_type does not use set to non-zero, a
            missing or superfluous reference, or log-probs of mismatched sizes or devices.
    """
    loss_type = check_choice("loss_type", loss_type, LOSS_TYPES)
    exponent = _length_exponent(length_normalization)
    beta, gamma, alpha, label_smoothing, sft_weight = _check_hyperparameters(
        loss_type, beta, gamma, alpha, label_smoothing, sft_weight
    )
    _check_reference_presence(loss_type, "ref_chosen", ref_chosen)
    _check_reference_presence(loss_type, "ref_rejected", ref_rejected)
    named = {
        "policy_chosen": _check_logps("policy_chosen", policy_chosen),
        "policy_rejected": _check_logps("policy_rejected", policy_rejected),
    }
    if loss_type in REFERENCE_LOSS_TYPES:
        named["ref_chosen"] = _check_logps("ref_chosen", ref_chosen)
        named["ref_rejected"] = _check_logps("ref_rejected", ref_rejected)
    _check_pairs(named)
    dtype = _score_dtype(*(logps.sum.dtype for logps in named.values()))

    chosen_score = _score(policy_chosen.sum, policy_chosen.count, exponent, dtype)
    rejected_score = _score(policy_rejected.sum, policy_rejected.count, exponent, dtype)
    if loss_type in REFERENCE_LOSS_TYPES:
        # the reference is a fixed target: no gradient may reach it (or a model behind it)
        chosen_score = chosen_score - _score(
            ref_chosen.sum.detach(), ref_chosen.count, exponent, dtype
        )
        rejected_score = rejected_score - _score(
            ref_rejected.sum.detach(), ref_rejected.count, exponent, dtype
        )
    # for "simpo" the scores are the policy's own; otherwise they are log-ratios to the reference
    h = chosen_score - rejected_score

    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * logsigmoid(beta * h)
        # skipped at eps = 0, where an infinite margin would make it 0 * inf = NaN
        if label_smoothing > 0.0:
            losses = losses - label_smoothing * logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    elif loss_type == "rdpo":
        length_gap = policy_chosen.count.to(dtype) - policy_rejected.count.to(dtype)
        losses = -logsigmoid(beta * h + alpha * length_gap)
    else:
        losses = -logsigmoid(beta * h - gamma)
    if sft_weight != 0.0:
        chosen_mean = _score(policy_chosen.sum, policy_chosen.count, 1.0, dtype)
        losses = losses - sft_weight * chosen_mean

    chosen_rewards = (beta * chosen_score).detach()
    rejected_rewards = (beta * rejected_score).detach()
    margins = chosen_rewards - rejected_rewards
    accuracies = torch.where(margins.isnan(), margins, (margins > 0).to(dtype))
    return PreferenceLossOutput(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=margins,
        accuracies=accuracies,
        chosen_lengths=policy_chosen.count,
        rejected_lengths=policy_rejected.count,
    )


def _rows(logps: SequenceLogProbs, rows: slice) -> SequenceLogProbs:
    return SequenceLogProbs(
        *(field[rows] if isinstance(field, torch.Tensor) else field for field in logps)
    )


def split_pairs(logps: SequenceLogProbs) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    """Split the 2B sequences of a TRL-layout batch into (chosen [B], rejected [B])."""
    n_pairs = logps.sum.shape[0] // 2
    return _rows(logps, slice(None, n_pairs)), _rows(logps, slice(n_pairs, None))


def preference_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    ref_logps: SequenceLogProbs | None = None,
    *,
    shift: bool = True,
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
        backend: "auto", "triton" or "torch", forwarded to ``sequence_logprobs``.
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
    policy = sequence_logprobs(logits, labels, mask, shift=shift, backend=backend)
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
        logit_scale, logit_softcap, chunk_rows: as for ``linear_sequence_logprobs``.

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
    _check_reference_presence(loss_type, "ref_logps", ref_logps)
    if ref_logps is not None:
        ref_logps = _check_logps("ref_logps", ref_logps)
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
