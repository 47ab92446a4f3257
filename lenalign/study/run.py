"""The length study's run: the reference, one policy per configuration, each evaluated.

The embedded tiny Llama is trained in two phases, every configuration from the same seed:

1. **Reference.** Supervised fine-tuning on the correct answers of the sort task
   (``lenalign.study.sort_task``), without filler: a policy that writes answers of the
   right length, as DPO assumes of its starting point (``train_reference``).
2. **Preference training**, once per configuration, from a copy of the reference, on
   pairs whose chosen completions are longer than the rejected ones by ``length_bias``
   tokens on average: every ``length_normalization`` (sum, lambda in between, mean) at
   every base beta, through ``lenalign.train.train``.

Each policy, and the reference as the starting point, is then evaluated on held-out
prompts and pairs (``evaluate_model``).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from ..api import sequence_logprobs
from ..train import (
    PreferencePair,
    TokenizedPair,
    TrainConfig,
    build_byte_tokenizer,
    build_tiny_llama,
    evaluate_preferences,
    generate_greedy,
    generation_metrics,
    limited_threads,
    micro_batch_indices,
    special_tokens,
    train,
)
from .config import Normalization, StudyConfig, length_exponent, normalization_label, scaled_beta
from .data import (
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    HeldOut,
    StudyData,
    build_data,
    demonstration_batch,
    demonstration_rows,
)
from .results import COLUMNS, StudyResult
from .sort_task import FILLER, sort_score, strip_filler

# greedy completions are decoded in batches this large; it changes speed, not results
GENERATION_BATCH_SIZE = 64


def train_reference(
    config: StudyConfig, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PreferencePair]
) -> PreTrainedModel:
    """The tiny Llama from ``seed``, fine-tuned on the correct answers of ``pairs``' prompts.

    Plain cross-entropy (the token mean over a batch) on the completion tokens, AdamW with
    a one-cycle schedule (10% warmup, cosine decay). The answers carry no filler, so the
    reference writes answers of the right length and any later change in length comes
    from the preference data.
    """
    model = build_tiny_llama(tokenizer, config.seed)
    pad = special_tokens(tokenizer).pad
    rows = demonstration_rows([p.prompt for p in pairs], tokenizer)
    # as many rows per step as a preference batch has (chosen and rejected)
    batch_rows = 2 * config.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft_learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.sft_learning_rate,
        total_steps=config.sft_steps,
        pct_start=0.1,
        cycle_momentum=False,
    )
    model.train()
    for step in range(config.sft_steps):
        indices = micro_batch_indices(len(rows), batch_rows, config.seed, step)
        batch = demonstration_batch([rows[i] for i in indices], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logprobs(logits, batch["input_ids"], batch["completion_mask"], shift=True)
        loss = -logps.sum.sum() / logps.count.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


@torch.no_grad()
def answer_logprob(model: PreTrainedModel, rows: Sequence[TokenizedPair], pad: int) -> float:
    """Mean log-likelihood per token of the correct answers' characters (``demonstration_rows``
    of the held-out prompts), the EOS left out: how much the model still believes the
    answer, whatever it appends to it."""
    model.eval()
    means = []
    for start in range(0, len(rows), GENERATION_BATCH_SIZE):
        batch = demonstration_batch(rows[start : start + GENERATION_BATCH_SIZE], pad)
        mask = batch["completion_mask"].clone()
        # each row ends with its EOS
        ends = batch["attention_mask"].sum(dim=1) - 1
        mask[torch.arange(mask.shape[0]), ends] = False
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        means.append(sequence_logprobs(logits, batch["input_ids"], mask, shift=True).mean)
    return float(torch.cat(means).mean())


def preference_config(
    config: StudyConfig, normalization: Normalization, beta: float, output_dir: str
) -> TrainConfig:
    """The trainer's settings for one configuration; only the loss options vary."""
    return TrainConfig(
        loss_type=config.loss_type,
        beta=beta,
        length_normalization=normalization,
        max_steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=min(10, config.steps),
        seed=config.seed,
        device="cpu",
        cpu_threads=config.cpu_threads,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
        logging_steps=config.steps,
        eval_steps=0,
        output_dir=output_dir,
        progress=False,
    )


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: StudyData,
    held_out: HeldOut,
    preferences: tuple[TrainConfig, PreTrainedModel] | None = None,
) -> dict[str, float]:
    """A model's measured columns of the results.

    Greedy completions of the held-out prompts: their length, how many stop, how many
    write filler, and their score, as written and without the trailing filler; the
    answers' log-likelihood (``answer_logprob``). With ``preferences`` (the run's trainer
    config and its reference model), the held-out preference accuracy on all pairs and on
    the plain ones, and the mean reward margin.
    """
    pad = special_tokens(tokenizer).pad
    generations = generate_greedy(
        model,
        tokenizer,
        [p.prompt for p in data.eval_pairs],
        max_new_tokens=data.max_new_tokens,
        max_prompt_length=MAX_PROMPT_LENGTH,
        batch_size=GENERATION_BATCH_SIZE,
    )
    metrics = generation_metrics(generations, sort_score)
    metrics["filler_rate"] = float(np.mean([FILLER in g.text for g in generations]))
    metrics["answer_score"] = float(
        np.mean([sort_score(g.prompt, strip_filler(g.text)) for g in generations])
    )
    metrics["answer_logprob"] = answer_logprob(model, held_out.answers, pad)
    if preferences is not None:
        config, reference = preferences
        pairs = evaluate_preferences(model, held_out.pairs, config, pad, reference)
        metrics["accuracy"], metrics["margin"] = pairs["accuracy"], pairs["margin"]
        if len(held_out.plain_pairs):
            plain = evaluate_preferences(model, held_out.plain_pairs, config, pad, reference)
            metrics["accuracy_plain"] = plain["accuracy"]
    return metrics


def run_study(config: StudyConfig, log: Callable[[str], None] = print) -> StudyResult:
    """Train the reference and one policy per (normalization, beta); evaluate each.

    ``log`` receives one line per phase as the study goes.
    """
    started = time.perf_counter()
    tokenizer = build_byte_tokenizer()
    data = build_data(config, tokenizer)
    held_out = HeldOut.of(data, tokenizer)
    log(
        f"data: {len(data.train_pairs)} training pairs, chosen {data.chosen_length:.2f} tokens, "
        f"rejected {data.rejected_length:.2f} (length bias "
        f"{data.chosen_length - data.rejected_length:.2f}); {len(data.eval_pairs)} held out"
    )
    with limited_threads(config.cpu_threads), _quiet_checkpoints():
        phase = time.perf_counter()
        reference = train_reference(config, tokenizer, data.train_pairs)
        reference_row = _row("reference", None, None, config)
        reference_row |= evaluate_model(reference, tokenizer, data, held_out)
        reference_row["seconds"] = time.perf_counter() - phase
        log(f"reference: {config.sft_steps} SFT steps, {_summary(reference_row)}")

        runs = []
        grid = [(n, b) for n in config.normalizations for b in config.betas]
        for number, (normalization, base_beta) in enumerate(grid, start=1):
            phase = time.perf_counter()
            beta = scaled_beta(base_beta, normalization, data.typical_length)
            name = f"{normalization_label(normalization)} beta={beta:.3g}"
            # the trainer's metrics and checkpoint are not part of the study's results
            with tempfile.TemporaryDirectory() as scratch:
                train_config = preference_config(config, normalization, beta, scratch)
                policy = train(
                    train_config,
                    model=copy.deepcopy(reference),
                    tokenizer=tokenizer,
                    train_pairs=data.train_pairs,
                    eval_pairs=[],
                ).model
            row = _row(name, normalization, base_beta, config) | {"beta": beta}
            row |= evaluate_model(
                policy, tokenizer, data, held_out, preferences=(train_config, reference)
            )
            row["seconds"] = time.perf_counter() - phase
            runs.append(row)
            log(f"[{number}/{len(grid)}] {name}: {_summary(row)}")
    return StudyResult(config, data, reference_row, runs, time.perf_counter() - started)


def _row(
    name: str, normalization: Normalization | None, base_beta: float | None, config: StudyConfig
) -> dict[str, Any]:
    """A result row with its identifying columns set and every measured column empty."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row["name"] = name
    if normalization is not None:
        row["normalization"] = normalization_label(normalization)
        row["exponent"] = length_exponent(normalization)
        row["base_beta"] = base_beta
        row["loss_type"] = config.loss_type
    return row


def _summary(row: dict[str, Any]) -> str:
    text = (
        f"length {row['gen_length']:.2f}, score {row['task_score']:.3f} "
        f"(answers {row['answer_score']:.3f}, log-prob {row['answer_logprob']:.2f}), "
        f"filler {row['filler_rate']:.2f}"
    )
    if row["accuracy"] is not None:
        text += f", accuracy {row['accuracy']:.3f}"
    return f"{text}, {row['seconds']:.0f} s"


@contextmanager
def _quiet_checkpoints() -> Iterator[None]:
    """Hide transformers' progress bar, which every checkpoint the trainer saves prints."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()
