"""Evaluation of a policy: held-out preference metrics and greedy generations.

``evaluate_preferences`` gives the eval line's loss, accuracy, margin and rewards;
``generate_greedy`` completes held-out prompts, and ``generation_metrics`` turns the
completions into lengths and, given a scorer, a task score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..integrations.hf import amp_context
from .config import TrainConfig
from .data import encode_prompt, special_tokens
from .dataset import PreferenceData, batches_in_order
from .step import batch_loss, forward_outputs, reference_logprobs

# score_fn(prompt, completion) -> how well the completion does the prompt's task
ScoreFn = Callable[[str, str], float]


@dataclass(frozen=True)
class Generation:
    """A greedy completion: its text (special tokens dropped) and its length in tokens."""

    prompt: str
    text: str
    num_tokens: int  # generated tokens, the EOS included (as completions are counted)
    finished: bool  # whether it ended with an EOS within max_new_tokens


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_prompt_length: int,
    batch_size: int,
    amp: torch.dtype | None = None,
    synced: bool = False,
) -> list[Generation]:
    """Greedy completions of ``prompts``, encoded as in training (BOS, end kept).

    Prompts are left-padded in batches so that every completion starts right after its
    prompt. The model is put in eval mode and left there. ``synced``: every rank of a
    sharded model runs forwards until all have finished (transformers' ``synced_gpus``),
    as each forward gathers parameters from all of them.
    """
    model.eval()
    tokens = special_tokens(tokenizer)
    device = next(model.parameters()).device
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=tokens.eos,
        pad_token_id=tokens.pad,
    )
    generations = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows = [encode_prompt(p, tokenizer, max_prompt_length) for p in chunk]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), tokens.pad, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.int64)
            attention_mask[i, width - len(row) :] = 1
        with amp_context(device, amp):
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=settings,
                synced_gpus=synced,
            )
        for prompt, new in zip(chunk, output[:, width:].tolist(), strict=True):
            if tokens.eos in new:
                end = new.index(tokens.eos)
                generations.append(Generation(prompt, _decode(tokenizer, new[:end]), end + 1, True))
            else:
                generations.append(Generation(prompt, _decode(tokenizer, new), len(new), False))
    return generations


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def generation_metrics(
    generations: Sequence[Generation], score_fn: ScoreFn | None = None
) -> dict[str, float]:
    """Mean generated length (tokens, EOS included), share finished, and mean task score."""
    metrics = {
        "gen_length": float(np.mean([g.num_tokens for g in generations])),
        "gen_finished": float(np.mean([g.finished for g in generations])),
    }
    if score_fn is not None:
        metrics["task_score"] = float(np.mean([score_fn(g.prompt, g.text) for g in generations]))
    return metrics


@torch.no_grad()
def evaluate_preferences(
    model: PreTrainedModel,
    data: PreferenceData,
    config: TrainConfig,
    pad: int,
    reference_model: PreTrainedModel | None = None,
    amp: torch.dtype | None = None,
) -> dict[str, float]:
    """Held-out loss, preference accuracy, margin and rewards, each a mean over the pairs.

    ``pad`` is the tokenizer's padding id; the reference log-probs come from
    ``data.reference`` when precomputed, else from ``reference_model``.
    """
    model.eval()
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    for batch in batches_in_order(data, config.batch_size, pad, device):
        reference = reference_logprobs(batch, data, reference_model, amp, config.fused_head)
        outputs = forward_outputs(model, batch, amp, config.fused_head)
        out = batch_loss(outputs, batch, reference, config)
        n_pairs = out.margins.shape[0]
        values = {
            "loss": out.loss * n_pairs,
            "accuracy": out.accuracies.sum(),
            "margin": out.margins.sum(),
            "chosen_reward": out.chosen_rewards.sum(),
            "rejected_reward": out.rejected_rewards.sum(),
        }
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return {name: total / len(data) for name, total in totals.items()}
