"""The training lines of metrics.jsonl: what a logging window accumulates, and how it reads.

Under ``distributed`` each rank scores its share of every micro-batch; a window sums its
rank's values and ``summary`` adds the sums of every rank before dividing, so a line
holds the means over the whole global batch, as one process would log them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..losses import PreferenceLossOutput
from .config import TrainConfig

# sums of every rank, in the order given (the identity in a single process)
SumFn = Callable[[Sequence[float]], list[float]]


def _local_sums(values: Sequence[float]) -> list[float]:
    return list(values)


class Window:
    """Training metrics accumulated between two logging steps."""

    per_pair = ("chosen_rewards", "rejected_rewards", "margins", "accuracies")
    per_pair += ("chosen_lengths", "rejected_lengths")

    def __init__(self) -> None:
        # sums in float64, so that adding the ranks' sums in any order changes no digit
        # that a float32 loss carries
        self.sums = dict.fromkeys(self.per_pair, 0.0)
        self.loss = 0.0
        self.pairs = 0
        self.tokens = 0
        self.seconds = 0.0
        self.grad_norms: list[float] = []

    def add(self, out: PreferenceLossOutput, tokens: int) -> None:
        """Add a micro-batch's loss output (a mean over its pairs) and its token count."""
        n_pairs = out.margins.shape[0]
        self.loss += float(out.loss.detach()) * n_pairs
        self.pairs += n_pairs
        self.tokens += tokens
        for name in self.per_pair:
            self.sums[name] += float(getattr(out, name).detach().double().sum())

    def summary(self, sums: SumFn = _local_sums) -> dict[str, float]:
        """The window's line: means over its pairs, of every rank with ``sums``.

        The gradient norms are the global ones already (see ``ParallelPolicy``); the
        seconds are this rank's.
        """
        totals = sums([self.loss, self.pairs, self.tokens, *self.sums.values()])
        loss, pairs, tokens = totals[:3]
        means = {name: total / pairs for name, total in zip(self.per_pair, totals[3:], strict=True)}
        return {
            "loss": loss / pairs,
            "chosen_reward": means["chosen_rewards"],
            "rejected_reward": means["rejected_rewards"],
            "margin": means["margins"],
            "accuracy": means["accuracies"],
            "chosen_length": means["chosen_lengths"],
            "rejected_length": means["rejected_lengths"],
            "grad_norm": float(np.mean(self.grad_norms)),
            "tokens_per_second": tokens / max(self.seconds, 1e-9),
        }


def epoch(step: int, config: TrainConfig, n_pairs: int) -> float:
    """Training pairs seen after ``step`` optimizer steps, over the training pairs."""
    pairs_seen = step * config.gradient_accumulation_steps * config.batch_size
    return pairs_seen / n_pairs


def format_metrics(record: dict[str, Any]) -> str:
    """A metrics.jsonl record's headline numbers on one line, as a run prints them."""
    shown = ("loss", "accuracy", "margin", "gen_length", "task_score")
    return "  ".join(f"{name} {record[name]:.3f}" for name in shown if name in record)
