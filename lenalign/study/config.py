"""The length study's settings: ``StudyConfig``, ``--quick``, and how betas follow lambda.

A score s(y) = sum / |y|**lambda is about |y|**lambda times smaller than the sum, so a
base beta b (the "sum" scale) becomes b * L**lambda, L being the mean completion length
of the training pairs in tokens: the typical pair then sees the same beta * margin
whatever lambda is (``scaled_beta``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import losses
from ..checks import check_choice, check_int, fail, finite_real, positive_finite

STUDY_LOSS_TYPES = ("sigmoid", "ipo")

Normalization = str | float


@dataclass(frozen=True)
class StudyConfig:
    """Every setting of a study; each field is also a ``lenalign study`` flag.

    Invalid values raise ValueError naming the field.
    """

    length_bias: float = 4.0
    loss_type: str = "sigmoid"
    normalizations: tuple[Normalization, ...] = ("sum", 0.25, 0.5, 0.75, "mean")
    betas: tuple[float, ...] = (0.03, 0.1, 0.3)
    seed: int = 0
    train_size: int = 4096
    eval_size: int = 256
    sft_steps: int = 300
    sft_learning_rate: float = 3e-3
    steps: int = 600
    learning_rate: float = 3e-4
    batch_size: int = 16
    cpu_threads: int = 1
    output_dir: str = "runs/study"

    def __post_init__(self) -> None:
        if finite_real("length_bias", self.length_bias) < 0:
            fail("length_bias", "a number >= 0", self.length_bias)
        check_choice("loss_type", self.loss_type, STUDY_LOSS_TYPES)
        if not self.normalizations:
            fail("normalizations", "at least one value", repr(self.normalizations))
        exponents = {length_exponent(value) for value in self.normalizations}
        if len(exponents) != len(self.normalizations):
            fail("normalizations", "distinct values", self.normalizations)
        if not self.betas:
            fail("betas", "at least one value", repr(self.betas))
        for beta in self.betas:
            positive_finite("betas", beta)
        if len(set(self.betas)) != len(self.betas):
            fail("betas", "distinct values", self.betas)
        for name in ("sft_learning_rate", "learning_rate"):
            positive_finite(name, getattr(self, name))
        positive = ("train_size", "eval_size", "sft_steps", "steps", "batch_size", "cpu_threads")
        for name in positive:
            check_int(name, getattr(self, name), minimum=1)
        check_int("seed", self.seed)


# --quick: two normalizations at one beta, fewer pairs and steps; within 2 minutes
QUICK = {
    "normalizations": ("sum", "mean"),
    "betas": (0.1,),
    "train_size": 2048,
    "eval_size": 128,
    "sft_steps": 250,
    "steps": 300,
}


def length_exponent(normalization: Normalization) -> float:
    """lambda of a ``length_normalization`` value: 0 for "sum", 1 for "mean", else itself;
    a bad one is named as the config field ``normalizations``."""
    return losses.length_exponent(normalization, "normalizations")


def normalization_label(normalization: Normalization) -> str:
    """How tables and the figure name a normalization: sum, mean or lambda=<value>."""
    if isinstance(normalization, str):
        return normalization
    return f"lambda={normalization:g}"


def scaled_beta(base_beta: float, normalization: Normalization, typical_length: float) -> float:
    """The beta of ``normalization`` that matches ``base_beta`` on summed scores:
    ``base_beta * typical_length**lambda``."""
    return base_beta * typical_length ** length_exponent(normalization)
