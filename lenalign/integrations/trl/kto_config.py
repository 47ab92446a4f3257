"""``LenalignKTOConfig``: TRL's KTOConfig plus the length normalization of its scores.

KTOTrainer (trl 1.16) scores every completion by its summed log-likelihood, for the
policy and the reference, in the loss and in the KL estimate (the mismatched pairs'
log-ratio). ``length_normalization`` replaces each of those sums by
sum / count**lambda, count the completion's scored tokens: "sum" (lambda 0, KTOTrainer's
scores), "mean" (lambda 1, the averaging operator of Grinsztajn et al., 2024) or a number
lambda in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import KTOConfig

from ...checks import fail
from ...losses import length_exponent
from .config import canonical_length_normalization

# KTOTrainer's loss types; each compares summed log-likelihoods (none divides by the
# length itself), so a lambda on them normalizes once. A loss type added by a later TRL
# may already normalize: it is refused with lambda != 0 until it is read.
SUMMING_KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def resolve_kto_exponent(args: KTOConfig) -> float:
    """lambda of the scores sum / count**lambda in ``args`` (a plain KTOConfig: 0).

    Raises:
        ValueError: naming ``length_normalization``, for a value outside "sum", "mean"
            and [0, 1], or lambda != 0 with a loss type not known to sum.
    """
    value = canonical_length_normalization(getattr(args, "length_normalization", "sum"))
    exponent = length_exponent(value)
    if exponent != 0.0 and args.loss_type not in SUMMING_KTO_LOSS_TYPES:
        fail(
            "length_normalization",
            f"'sum' with loss_type {args.loss_type!r}, which is not one of the loss types "
            f"known to compare summed log-likelihoods {SUMMING_KTO_LOSS_TYPES} (a lambda on "
            "a loss that already normalizes would normalize twice)",
            repr(value),
        )
    return exponent


@dataclass
class LenalignKTOConfig(KTOConfig):
    r"""TRL's KTOConfig, for LenalignKTOTrainer, with one more field.

    Parameters:
        length_normalization (`str` or `float`, *optional*, defaults to `"sum"`):
            The score of a completion in every KTO term is s(y) = log pi(y|x) /
            |y|**lambda, for the policy and the reference, in the loss and in the KL
            estimate alike, |y| the completion's token count: `"sum"` (lambda = 0,
            KTOTrainer's scores), `"mean"` (lambda = 1, averaged log-likelihoods) or a
            number lambda in [0, 1]. The logged `logps/*` and `rewards/*` are of these
            scores. From the command line a number is given as text ("0.5").
    """

    # float | str | None, not str | float: HfArgumentParser keeps the non-str member of a
    # two-member union (float, which refuses "mean") but str when None is a member; None
    # itself is refused by the check
    length_normalization: float | str | None = field(
        default="sum",
        metadata={
            "help": "Scores s(y) = log pi(y|x) / |y|**lambda for policy and reference, in the "
            "loss and the KL estimate: 'sum' (lambda 0, as KTOTrainer), 'mean' (lambda 1, "
            "averaged log-likelihoods) or a number lambda in [0, 1]."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.length_normalization = canonical_length_normalization(self.length_normalization)
        resolve_kto_exponent(self)
