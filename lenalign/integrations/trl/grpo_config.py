"""``LenalignGRPOConfig``: TRL's GRPOConfig for LenalignGRPOTrainer.

Every GRPOConfig field keeps its meaning, the length normalizations of GRPO's
``loss_type`` among them (grpo: each sequence's token mean; bnpo: the batch's tokens;
dr_grpo: a constant; dapo: the global token count; luspo: per-sequence sums): they are
TRL's formulas, applied to lenalign's per-token log-probabilities. What lenalign cannot
serve is refused here, before a model is loaded: the entropy bonus (``entropy_coef`` !=
0, ``use_adaptive_entropy``), whose loss differentiates the entropy, which lenalign
computes as a statistic without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import GRPOConfig

from ...checks import fail


def refuse_entropy_bonus(args: GRPOConfig) -> None:
    """Raise, naming the field, where ``args`` asks for GRPO's entropy bonus.

    Raises:
        ValueError: naming ``entropy_coef`` (or ``use_adaptive_entropy``): lenalign's
            entropy has no gradient, and the bonus differentiates it.
    """
    why = "(lenalign's entropy is a statistic without gradient; the bonus differentiates it)"
    if args.use_adaptive_entropy:
        fail("use_adaptive_entropy", f"False {why}", True)
    if args.entropy_coef != 0.0:
        fail("entropy_coef", f"0.0 {why}", args.entropy_coef)


@dataclass
class LenalignGRPOConfig(GRPOConfig):
    r"""TRL's GRPOConfig, for LenalignGRPOTrainer: the same fields, with what lenalign
    cannot serve (the entropy bonus) refused when the config is made."""

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_entropy_bonus(self)
