"""``LenalignDPOConfig``: TRL's DPOConfig plus the length normalization of the scores.

Every DPOConfig field keeps its meaning. Three fields are added: ``length_normalization``
(the exponent lambda of the scores s(y) = log pi(y|x) / |y|**lambda, for policy and
reference alike), and the hyperparameters of lenalign's two loss types that TRL's
DPOTrainer lacks, ``simpo_gamma`` (SimPO's target margin, TRL's CPOConfig name and
default) and ``rdpo_alpha`` (R-DPO's length penalty). ``resolve_settings`` reads and
checks them from any DPOConfig, so the trainer also accepts a plain one ("sum", the
defaults).
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, field

from trl import DPOConfig

from ...checks import fail, finite_real
from ...losses import NAMED_EXPONENTS, length_exponent

# DPOTrainer's loss types in trl 1.16 (DPOConfig.loss_type's help lists the same)
TRL_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# lenalign's own, absent from DPOTrainer: SimPO (reference-free) and R-DPO
LENALIGN_LOSS_TYPES = ("simpo", "rdpo")
LOSS_TYPES = TRL_LOSS_TYPES + LENALIGN_LOSS_TYPES
# TRL divides these two by the completion length itself; a length exponent on top would
# divide twice, so they take "sum" only
SELF_NORMALIZED_LOSS_TYPES = ("ipo", "sigmoid_norm")
REFERENCE_FREE_LOSS_TYPES = ("simpo",)


def canonical_length_normalization(value: object) -> str | float:
    """``value`` as "sum", "mean" or a float in [0, 1]; a number written as a string (as
    HfArgumentParser passes it from the command line) becomes that float."""
    if isinstance(value, str) and value not in NAMED_EXPONENTS:
        with suppress(ValueError):
            value = float(value)
    exponent = length_exponent(value)  # the losses' own check, with their message
    return value if isinstance(value, str) else exponent


@dataclass(frozen=True)
class LengthSettings:
    """What LenalignDPOTrainer reads beyond DPOConfig, checked against the loss types.

    Attributes:
        exponent: lambda of s(y) = sum / count**lambda (0 for "sum", 1 for "mean").
        loss_types: DPOConfig.loss_type as a tuple.
        simpo_gamma: SimPO's target margin, in units of beta times a score.
        rdpo_alpha: R-DPO's weight of the token-count difference |y_w| - |y_l|.
    """

    exponent: float
    loss_types: tuple[str, ...]
    simpo_gamma: float
    rdpo_alpha: float

    @property
    def reference_free(self) -> bool:
        """Whether no loss type needs the reference model (SimPO alone)."""
        return all(name in REFERENCE_FREE_LOSS_TYPES for name in self.loss_types)


def resolve_settings(args: DPOConfig) -> LengthSettings:
    """The length settings of ``args`` (a LenalignDPOConfig, or a plain DPOConfig: "sum").

    Raises:
        ValueError: naming the field, for an unknown loss type, a lambda outside [0, 1],
            lambda != 0 with a loss type that TRL already length-normalizes (ipo,
            sigmoid_norm) or with ``ld_alpha``, ``rdpo_alpha`` != 0 without "rdpo", a
            non-finite ``simpo_gamma``, or ``precompute_ref_log_probs`` with SimPO alone
            (its reference is never used).
    """
    loss_types = tuple(args.loss_type)
    unknown = [name for name in loss_types if name not in LOSS_TYPES]
    if unknown:
        fail("loss_type", f"names among {LOSS_TYPES}", unknown)
    value = canonical_length_normalization(getattr(args, "length_normalization", "sum"))
    exponent = length_exponent(value)
    if exponent != 0.0:
        for name in SELF_NORMALIZED_LOSS_TYPES:
            if name in loss_types:
                fail(
                    "length_normalization",
                    f"'sum' with loss_type {name!r}, which TRL already divides by the "
                    "completion length (another exponent would normalize twice; "
                    "'sigmoid_norm' is 'sigmoid' with 'mean')",
                    repr(value),
                )
        if args.ld_alpha is not None:
            fail(
                "length_normalization",
                "'sum' with ld_alpha (LD-DPO reweights the tail of the summed "
                "log-likelihood, its own answer to length)",
                repr(value),
            )
    simpo_gamma = finite_real("simpo_gamma", getattr(args, "simpo_gamma", 0.5))
    rdpo_alpha = finite_real("rdpo_alpha", getattr(args, "rdpo_alpha", 0.0))
    if rdpo_alpha != 0.0 and "rdpo" not in loss_types:
        fail("rdpo_alpha", "0 unless loss_type includes 'rdpo' (no other loss uses it)", rdpo_alpha)
    settings = LengthSettings(exponent, loss_types, simpo_gamma, rdpo_alpha)
    if settings.reference_free and args.precompute_ref_log_probs:
        fail(
            "precompute_ref_log_probs",
            f"False with the reference-free loss_type {list(loss_types)} (the reference "
            "log-probs would be computed and never used)",
            True,
        )
    return settings


@dataclass
class LenalignDPOConfig(DPOConfig):
    r"""TRL's DPOConfig, for LenalignDPOTrainer, with three more fields.

    Parameters:
        length_normalization (`str` or `float`, *optional*, defaults to `"sum"`):
            The scores that every loss type compares are s(y) = log pi(y|x) / |y|**lambda,
            for the policy and the reference alike, |y| the completion's token count:
            `"sum"` (lambda = 0, DPOTrainer's scores), `"mean"` (lambda = 1, the
            averaging operator of Grinsztajn et al., 2024) or a number lambda in [0, 1].
            `"ipo"` and `"sigmoid_norm"` take `"sum"` only: TRL already divides them by
            the length. From the command line a number is given as text ("0.5").
        simpo_gamma (`float`, *optional*, defaults to `0.5`):
            Target margin of `loss_type="simpo"`: -log sigmoid(beta (s(y_w) - s(y_l)) -
            gamma), reference-free (TRL's CPOConfig name and default).
        rdpo_alpha (`float`, *optional*, defaults to `0.0`):
            Length penalty of `loss_type="rdpo"`: -log sigmoid(beta h + alpha (|y_w| -
            |y_l|)); must stay 0 without "rdpo".

    `loss_type` also accepts `"simpo"` and `"rdpo"`, alone or in a list with TRL's.
    """

    # float | str | None, not str | float: HfArgumentParser keeps the non-str member of a
    # two-member union (float, which refuses "mean") but str when None is a member; None
    # itself is refused by the check
    length_normalization: float | str | None = field(
        default="sum",
        metadata={
            "help": "Scores s(y) = log pi(y|x) / |y|**lambda for policy and reference: 'sum' "
            "(lambda 0, as DPOTrainer), 'mean' (lambda 1, averaged log-likelihoods) or a "
            "number lambda in [0, 1]. 'ipo' and 'sigmoid_norm' take 'sum' only."
        },
    )
    simpo_gamma: float = field(
        default=0.5,
        metadata={"help": "Target margin of loss_type 'simpo' (reference-free)."},
    )
    rdpo_alpha: float = field(
        default=0.0,
        metadata={"help": "Weight of |y_w| - |y_l| in loss_type 'rdpo'; 0 without it."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.length_normalization = canonical_length_normalization(self.length_normalization)
        resolve_settings(self)
