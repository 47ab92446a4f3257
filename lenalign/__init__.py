"""lenalign: fused, length-normalized sequence log-likelihoods for direct alignment."""

from .api import sequence_logprobs
from .outputs import SequenceLogProbs
from .reference import reference_sequence_logprobs

__all__ = ["SequenceLogProbs", "reference_sequence_logprobs", "sequence_logprobs"]
__version__ = "0.1.0"
