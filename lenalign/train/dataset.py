"""The trainer's data sets: the pairs a config names, tokenized, and the run's batch order.

A run's micro-batches are a function of (seed, micro-batch number) alone
(``micro_batch_indices``), so that a resumed run replays the very order it left.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..outputs import SequenceLogProbs
from .config import TrainConfig
from .data import PreferencePair, TokenizedPair, collate_pairs, load_preference_jsonl
from .task import make_case_pairs

# the (chosen, rejected) log-likelihoods of a batch's or a data set's pairs
PairLogProbs = tuple[SequenceLogProbs, SequenceLogProbs]


@dataclass
class PreferenceData:
    """A tokenized data set, and its reference log-probs once precomputed."""

    pairs: list[PreferencePair]
    rows: list[TokenizedPair]
    reference: PairLogProbs | None = None  # [N] each, indexed by pair

    def __len__(self) -> int:
        return len(self.rows)


def load_pairs(config: TrainConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The (training, held-out) pairs that the config names.

    The embedded task draws ``synthetic_size + eval_size`` pairs from ``seed`` and holds
    out the last ``eval_size``; a ``train_file`` without ``eval_file`` gives up a seeded
    random ``eval_size`` of its pairs; an ``eval_file`` is read and cut to ``eval_size``.
    """
    if config.train_file is None:
        pairs = make_case_pairs(config.synthetic_size + config.eval_size, config.seed)
        return pairs[: config.synthetic_size], pairs[config.synthetic_size :]
    train_pairs = load_preference_jsonl(config.train_file)
    if config.eval_file is not None:
        return train_pairs, load_preference_jsonl(config.eval_file)[: config.eval_size]
    if config.eval_size >= len(train_pairs):
        raise ValueError(
            f"eval_size: {config.eval_size} held-out pairs would leave no training pair of "
            f"the {len(train_pairs)} in {config.train_file}; lower it or give an eval_file"
        )
    order = list(range(len(train_pairs)))
    random.Random(config.seed).shuffle(order)
    held_out = set(order[: config.eval_size])
    return (
        [p for i, p in enumerate(train_pairs) if i not in held_out],
        [train_pairs[i] for i in sorted(held_out)],
    )


def indexed_batch(
    data: PreferenceData, indices: Sequence[int], pad: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The pairs of ``data`` at ``indices`` collated (``collate_pairs``) on ``device``, with
    their ``index`` [B], by which precomputed reference log-probs are looked up."""
    batch = collate_pairs([data.rows[i] for i in indices], pad)
    batch["index"] = torch.tensor(indices, dtype=torch.int64)
    return {name: tensor.to(device) for name, tensor in batch.items()}


def batches_in_order(
    data: PreferenceData, batch_size: int, pad: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Every pair of ``data`` once, in order, as ``indexed_batch``-es of ``batch_size``."""
    for start in range(0, len(data), batch_size):
        yield indexed_batch(data, range(start, min(start + batch_size, len(data))), pad, device)


def micro_batch_indices(n_pairs: int, batch_size: int, seed: int, number: int) -> list[int]:
    """Pair indices of micro-batch ``number`` (from 0) of a run.

    The pairs are an endless sequence of epochs, each a permutation drawn from
    (``seed``, epoch), cut into consecutive micro-batches; a batch may straddle two
    epochs. A function of its arguments only, so a resumed run picks up the very order
    that it left.
    """
    start = number * batch_size
    indices: list[int] = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), n_pairs)
        order = np.random.default_rng([seed, epoch]).permutation(n_pairs)
        indices.extend(order[offset : offset + batch_size - len(indices)].tolist())
    return indices
