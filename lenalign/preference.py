"""Direct alignment losses on summed, averaged and interpolated sequence log-likelihoods:
the formulas, on per-sequence scores (public through ``lenalign.losses``).

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
from typing import NamedTuple

import torch
from torch.nn.functional import logsigmoid

from .checks import check_choice, fail, finite_real
from .layout import INTEGER_DTYPES
from .outputs import SequenceLogProbs, TokenStats

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


def length_exponent(length_normalization: object, argument: str = "length_normalization") -> float:
    """lambda of the score s(y) = sum / count**lambda from a ``length_normalization``
    value: 0 for "sum", 1 for "mean", else a number in [0, 1]; ValueError naming
    ``argument`` otherwise. The study and the TRL config parse theirs here too."""
    expected = "'sum', 'mean' or a number lambda in [0, 1]"
    if isinstance(length_normalization, str):
        if length_normalization not in NAMED_EXPONENTS:
            fail(argument, expected, repr(length_normalization))
        return NAMED_EXPONENTS[length_normalization]
    if isinstance(length_normalization, bool) or not isinstance(length_normalization, Real):
        fail(argument, expected, type(length_normalization).__name__)
    exponent = float(length_normalization)
    # written so that NaN fails too
    if not 0.0 <= exponent <= 1.0:
        fail(argument, expected, exponent)
    return exponent


def check_reference_presence(loss_type: str, argument: str, reference: object) -> None:
    """Refuse a missing reference where ``loss_type`` needs one, and one given where not."""
    if loss_type in REFERENCE_LOSS_TYPES and reference is None:
        fail(argument, f"the reference log-probs that loss_type={loss_type!r} needs", None)
    if loss_type not in REFERENCE_LOSS_TYPES and reference is not None:
        fail(
            argument,
            f"None (loss_type={loss_type!r} is reference-free and would ignore a reference)",
            f"a {type(reference).__name__}",
        )


def check_logps(argument: str, logps: object) -> SequenceLogProbs:
    """``logps`` itself if it is a SequenceLogProbs with a 1-D float sum and integer counts."""
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
    exponent = length_exponent(length_normalization)
    logps = check_logps("logps", logps)
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
    exponent = length_exponent(length_normalization)
    beta, gamma, alpha, label_smoothing, sft_weight = _check_hyperparameters(
        loss_type, beta, gamma, alpha, label_smoothing, sft_weight
    )
    check_reference_presence(loss_type, "ref_chosen", ref_chosen)
    check_reference_presence(loss_type, "ref_rejected", ref_rejected)
    named = {
        "policy_chosen": check_logps("policy_chosen", policy_chosen),
        "policy_rejected": check_logps("policy_rejected", policy_rejected),
    }
    if loss_type in REFERENCE_LOSS_TYPES:
        named["ref_chosen"] = check_logps("ref_chosen", ref_chosen)
        named["ref_rejected"] = check_logps("ref_rejected", ref_rejected)
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
    fields = []
    for field in logps:
        if isinstance(field, TokenStats):
            field = TokenStats(*[values[rows] for values in field])
        elif isinstance(field, torch.Tensor):
            field = field[rows]
        fields.append(field)
    return SequenceLogProbs(*fields)


def split_pairs(logps: SequenceLogProbs) -> tuple[SequenceLogProbs, SequenceLogProbs]:
    """Split the 2B sequences of a TRL-layout batch into (chosen [B], rejected [B])."""
    n_pairs = logps.sum.shape[0] // 2
    return _rows(logps, slice(None, n_pairs)), _rows(logps, slice(n_pairs, None))
