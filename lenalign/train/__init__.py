"""The reference trainer: preference training of a Hugging Face causal LM through the fused loss.

``train(TrainConfig(...))`` runs a whole training (data, reference model, logging,
evaluation, checkpoints) and returns a ``TrainResult``; ``lenalign train`` is its command
(``lenalign.train.cli``). With the default config it trains the embedded tiny Llama on
the embedded case task, offline, in seconds on a CPU. docs/trainer.md documents every
config field.

The modules, each with one concern:

- ``config``: ``TrainConfig``, its checks, ``read_config_file``, ``loss_options``.
- ``step``: the loss of one batch, the code to copy from: ``completion_logprobs``,
  ``batch_loss``, ``forward_outputs``, ``precompute_reference``.
- ``data``: pairs and their layout: ``PreferencePair``, ``TokenizedPair``,
  ``load_preference_jsonl``, ``write_preference_jsonl``, ``special_tokens``,
  ``tokenize_pair(s)``, ``collate_pairs``.
- ``dataset``: a run's data sets and batch order: ``PreferenceData``, ``load_pairs``,
  ``micro_batch_indices``.
- ``evaluate``: ``evaluate_preferences``, ``generate_greedy`` (``Generation``),
  ``generation_metrics``.
- ``checkpoint``: ``find_checkpoint``, ``save_checkpoint``, ``load_checkpoint``.
- ``loop``: ``train``, ``TrainResult``.
- ``models``: ``load_model``, ``limited_threads``, the optimizer, device and precision.
- ``metrics``: the training lines of metrics.jsonl.
- ``parallel`` and ``sharding``: ``distributed`` runs under torchrun: the ranks
  (``World``), and the policy under DDP or FSDP2 (``ParallelPolicy``).
- ``tiny`` and ``task``: the embedded model (``build_tiny_llama``,
  ``build_byte_tokenizer``) and the embedded case task (``make_case_pairs``,
  ``case_task_score``).

The Hugging Face forwards that the step uses (logits, or the LM head's input for the
fused head) are ``lenalign.integrations.hf``'s.
"""

from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, loss_options, read_config_file
from .data import (
    PreferencePair,
    SpecialTokens,
    TokenizedPair,
    collate_pairs,
    load_preference_jsonl,
    special_tokens,
    tokenize_pair,
    tokenize_pairs,
    write_preference_jsonl,
)
from .dataset import PreferenceData, load_pairs, micro_batch_indices
from .evaluate import Generation, evaluate_preferences, generate_greedy, generation_metrics
from .loop import TrainResult, train
from .models import limited_threads, load_model
from .step import batch_loss, completion_logprobs, forward_outputs, precompute_reference
from .task import case_task_answer, case_task_score, make_case_pairs
from .tiny import build_byte_tokenizer, build_tiny_llama

__all__ = [
    "Generation",
    "PreferenceData",
    "PreferencePair",
    "SpecialTokens",
    "TokenizedPair",
    "TrainConfig",
    "TrainResult",
    "batch_loss",
    "build_byte_tokenizer",
    "build_tiny_llama",
    "case_task_answer",
    "case_task_score",
    "collate_pairs",
    "completion_logprobs",
    "evaluate_preferences",
    "find_checkpoint",
    "forward_outputs",
    "generate_greedy",
    "generation_metrics",
    "limited_threads",
    "load_checkpoint",
    "load_model",
    "load_pairs",
    "load_preference_jsonl",
    "loss_options",
    "make_case_pairs",
    "micro_batch_indices",
    "precompute_reference",
    "read_config_file",
    "save_checkpoint",
    "special_tokens",
    "tokenize_pair",
    "tokenize_pairs",
    "train",
    "write_preference_jsonl",
]
