"""The metrics DPOTrainer logs, from lenalign's outputs.

The same keys, the same reductions and the same cross-process gathers as trl 1.16's
``DPOTrainer._compute_loss``: token-weighted means for ``entropy``,
``logits/chosen``, ``logits/rejected`` and ``mean_token_accuracy``, pair means for
``rewards/*`` and ``logps/*``, a running total for ``num_tokens``. The per-token figures
come from lenalign's TokenStats, computed in the pass that computed the
log-probabilities; ``DPOTrainer.log`` averages them over the steps between two logs and
prefixes ``eval_`` in evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...outputs import TokenStats

if TYPE_CHECKING:
    from trl import DPOTrainer


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def record_metrics(
    trainer: DPOTrainer,
    mode: str,
    attention_mask: torch.Tensor,
    counts: torch.Tensor,
    stats: TokenStats,
    rewards: tuple[torch.Tensor, torch.Tensor],
    logps: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Append one batch's metrics to ``trainer._metrics[mode]``.

    Args:
        trainer: the trainer whose accelerator gathers and whose ``_metrics`` collects.
        mode: "train" or "eval".
        attention_mask: [2B, T] the batch's attention mask (tokens seen, for num_tokens).
        counts: [2B] int64 scored tokens per sequence (chosen first, then rejected).
        stats: the policy's TokenStats, [2B, T] each, 0 (False) where not counted.
        rewards: ([B], [B]) detached chosen and rejected rewards.
        logps: ([B], [B]) detached summed log-likelihoods of chosen and rejected.
    """
    gather_for_metrics = trainer.accelerator.gather_for_metrics
    metrics = trainer._metrics[mode]
    n_pairs = counts.shape[0] // 2
    chosen_tokens, rejected_tokens = counts[:n_pairs].sum(), counts[n_pairs:].sum()

    entropy_sum = gather_for_metrics(stats.entropy.detach().sum()).sum()
    total_tokens = gather_for_metrics(counts.sum()).sum()
    metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)

    if mode == "train":
        seen = gather_for_metrics(attention_mask.sum()).sum().item()
        trainer._total_train_tokens += seen // trainer._tp_size
    metrics["num_tokens"] = [trainer._total_train_tokens]

    mean_logits = stats.mean_logits.detach()
    chosen_logits = gather_for_metrics(mean_logits[:n_pairs].sum()).sum().item()
    rejected_logits = gather_for_metrics(mean_logits[n_pairs:].sum()).sum().item()
    chosen_total = gather_for_metrics(chosen_tokens).sum().item()
    rejected_total = gather_for_metrics(rejected_tokens).sum().item()
    metrics["logits/chosen"].append(_ratio(chosen_logits, chosen_total))
    metrics["logits/rejected"].append(_ratio(rejected_logits, rejected_total))

    correct = gather_for_metrics(stats.is_top1[:n_pairs].sum())
    chosen_counts = gather_for_metrics(chosen_tokens)
    total = chosen_counts.sum()
    metrics["mean_token_accuracy"].append((correct.sum() / total).item() if total > 0 else 0.0)

    gather = trainer.accelerator.gather
    chosen_rewards, rejected_rewards = rewards
    metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
    metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
    accuracies = (chosen_rewards > rejected_rewards).float()
    metrics["rewards/accuracies"].append(gather(accuracies).mean().item())
    metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
    chosen_logps, rejected_logps = logps
    metrics["logps/chosen"].append(gather(chosen_logps).mean().item())
    metrics["logps/rejected"].append(gather(rejected_logps).mean().item())
