"""The losses, public: the formulas on per-sequence scores (preference.py) and their
one-call forms for a concatenated batch in TRL's layout (pair_batch.py).

Every loss compares sequence scores s(y) = sum / count**lambda, the same operator applied
to policy and reference alike; lambda = 1 is the averaging operator of "Averaging
log-likelihoods in direct alignment" (Grinsztajn et al., 2024). docs/losses.md has the
formulas. The batch forms build on the formulas, so they live apart and meet here.
"""

from .pair_batch import preference_loss_from_hidden, preference_loss_from_logits
from .preference import (
    LOSS_TYPES,
    NAMED_EXPONENTS,
    REFERENCE_LOSS_TYPES,
    PreferenceLossOutput,
    length_exponent,
    preference_loss,
    sequence_score,
    split_pairs,
)

__all__ = [
    "LOSS_TYPES",
    "NAMED_EXPONENTS",
    "REFERENCE_LOSS_TYPES",
    "PreferenceLossOutput",
    "length_exponent",
    "preference_loss",
    "preference_loss_from_hidden",
    "preference_loss_from_logits",
    "sequence_score",
    "split_pairs",
]
