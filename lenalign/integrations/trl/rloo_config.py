"""``LenalignRLOOConfig``: TRL's RLOOConfig plus the length normalization of its scores.

RLOOTrainer (trl 1.16) scores a completion by its summed log-probability: the
importance ratio exp(log pi(y|x) - log pi_old(y|x)) of its loss and the KL penalty
(log pi_old(y|x) - log pi_ref(y|x)) subtracted from the reward are differences of sums.
``length_normalization`` replaces each of those sums by sum / count**lambda, count the
completion's scored tokens: "sum" (lambda 0, RLOOTrainer's scores), "mean" (lambda 1,
the averaging operator of Grinsztajn et al., 2024) or a number lambda in [0, 1]. For a
completion y of n tokens the policy term becomes exp((log pi(y|x) - log pi_old(y|x)) /
n**lambda) and the penalty beta * (log pi_old(y|x) - log pi_ref(y|x)) / n**lambda.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import RLOOConfig

from ...losses import length_exponent
from .config import canonical_length_normalization


def resolve_rloo_exponent(args: RLOOConfig) -> float:
    """lambda of the scores sum / count**lambda in ``args`` (a plain RLOOConfig: 0).

    Raises:
        ValueError: naming ``length_normalization``, for a value outside "sum", "mean"
            and [0, 1].
    """
    value = canonical_length_normalization(getattr(args, "length_normalization", "sum"))
    return length_exponent(value)


@dataclass
class LenalignRLOOConfig(RLOOConfig):
    r"""TRL's RLOOConfig, for LenalignRLOOTrainer, with one more field.

    Parameters:
        length_normalization (`str` or `float`, *optional*, defaults to `"sum"`):
            The score of a completion y in the importance ratio and in the KL penalty is
            s(y) = log pi(y|x) / |y|**lambda, for the policy, the old policy and the
            reference alike, |y| its token count: `"sum"` (lambda = 0, RLOOTrainer's
            scores), `"mean"` (lambda = 1, averaged log-probabilities) or a number
            lambda in [0, 1]. From the command line a number is given as text ("0.5").
    """

    # float | str | None, not str | float: see LenalignKTOConfig (HfArgumentParser)
    length_normalization: float | str | None = field(
        default="sum",
        metadata={
            "help": "Scores s(y) = log pi(y|x) / |y|**lambda in the importance ratio and the "
            "KL penalty: 'sum' (lambda 0, as RLOOTrainer), 'mean' (lambda 1, averaged "
            "log-probabilities) or a number lambda in [0, 1]."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.length_normalization = canonical_length_normalization(self.length_normalization)
