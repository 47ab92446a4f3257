"""The length study's data: length-biased sort pairs, their lengths, the held-out sets.

Lengths are in tokens as the trainer counts them (a completion's tokens and its EOS).
The correct answers of the prompts double as supervised rows (``demonstration_rows``):
the reference is fine-tuned on them, and every model is scored on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ..train import PreferenceData, PreferencePair, TokenizedPair, collate_pairs, tokenize_pairs
from .config import StudyConfig
from .sort_task import FILLER, make_sort_pairs, sort_answer

# the data's rows are a few dozen tokens at most: these limits never truncate anything
MAX_LENGTH = 128
MAX_PROMPT_LENGTH = 64


@dataclass(frozen=True)
class StudyData:
    """The pairs of a study and the lengths that describe them, in tokens (EOS included)."""

    train_pairs: list[PreferencePair]
    eval_pairs: list[PreferencePair]
    chosen_length: float  # mean over the training pairs
    rejected_length: float
    answer_length: float  # mean over the held-out prompts' correct answers
    max_new_tokens: int  # limit of a greedy completion

    @property
    def typical_length(self) -> float:
        """Mean length of a training completion, chosen and rejected pooled."""
        return (self.chosen_length + self.rejected_length) / 2


def completion_tokens(text: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of a completion as the trainer counts them: its tokens and the EOS."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1


def build_data(config: StudyConfig, tokenizer: PreTrainedTokenizerBase) -> StudyData:
    """``train_size + eval_size`` pairs from ``seed``, the last ``eval_size`` held out."""
    pairs = make_sort_pairs(
        config.train_size + config.eval_size, config.seed, length_bias=config.length_bias
    )
    train_pairs, eval_pairs = pairs[: config.train_size], pairs[config.train_size :]
    chosen = [completion_tokens(p.chosen, tokenizer) for p in train_pairs]
    rejected = [completion_tokens(p.rejected, tokenizer) for p in train_pairs]
    answers = [completion_tokens(sort_answer(p.prompt), tokenizer) for p in eval_pairs]
    return StudyData(
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        chosen_length=float(np.mean(chosen)),
        rejected_length=float(np.mean(rejected)),
        answer_length=float(np.mean(answers)),
        # room for twice the longest chosen completion, so that a policy that learned to
        # write more filler than the data holds is measured, not cut at the data's length
        max_new_tokens=2 * max(chosen),
    )


def demonstration_rows(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> list[TokenizedPair]:
    """Each prompt followed by its correct answer and the EOS, tokenized as the trainer
    tokenizes a chosen completion (a pair whose two completions are the answer; its
    rejected half goes unused)."""
    answers = [sort_answer(prompt) for prompt in prompts]
    pairs = [PreferencePair(p, a, a) for p, a in zip(prompts, answers, strict=True)]
    return tokenize_pairs(pairs, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)


def demonstration_batch(rows: Sequence[TokenizedPair], pad: int) -> dict[str, torch.Tensor]:
    """``rows`` as one right-padded batch: ``input_ids``, ``attention_mask`` and
    ``completion_mask``, [len(rows), T] each."""
    # collate_pairs lays the chosen rows out first: they are the batch's first half
    batch = collate_pairs(rows, pad)
    return {name: tensor[: len(rows)] for name, tensor in batch.items()}


@dataclass(frozen=True)
class HeldOut:
    """What every model is evaluated on: the held-out pairs, tokenized, and their prompts'
    correct answers."""

    pairs: PreferenceData
    plain_pairs: PreferenceData  # those without filler: only correctness tells them apart
    answers: list[TokenizedPair]  # demonstration_rows of the held-out prompts

    @classmethod
    def of(cls, data: StudyData, tokenizer: PreTrainedTokenizerBase) -> HeldOut:
        """The held-out sets of a study's data."""
        pairs = data.eval_pairs
        rows = tokenize_pairs(pairs, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
        plain = [i for i, pair in enumerate(pairs) if not pair.chosen.endswith(FILLER)]
        return cls(
            pairs=PreferenceData(list(pairs), rows),
            plain_pairs=PreferenceData([pairs[i] for i in plain], [rows[i] for i in plain]),
            answers=demonstration_rows([pair.prompt for pair in pairs], tokenizer),
        )
