"""lenalign: fused, length-normalized sequence log-likelihoods for direct alignment."""

from .api import linear_sequence_logprobs, sequence_logprobs
from .losses import PreferenceLossOutput, preference_loss, sequence_score
from .outputs import SequenceLogProbs, TokenStats
from .pair_batch import preference_loss_from_hidden, preference_loss_from_logits
from .reference import reference_sequence_logprobs
from .vocab_shard import VocabShard

__all__ = [
    "PreferenceLossOutput",
    "SequenceLogProbs",
    "TokenStats",
    "VocabShard",
    "linear_sequence_logprobs",
    "preference_loss",
    "preference_loss_from_hidden",
    "preference_loss_from_logits",
    "reference_sequence_logprobs",
    "sequence_logprobs",
    "sequence_score",
]
__version__ = "0.1.0"
