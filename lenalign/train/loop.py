"""The training run: ``train(config)`` from data and models to metrics and checkpoints.

With the default config it trains the embedded tiny Llama on the embedded case task,
offline, in seconds on a CPU. The loss of each step is ``lenalign.train.step``'s; this
module owns what surrounds it: the models, the optimizer and its schedule, gradient
accumulation and clipping, logging, evaluation and checkpoints. Under torchrun
(``distributed``) each rank runs this same loop on its share of every micro-batch
(``lenalign.train.parallel`` and ``sharding``); rank 0 alone writes and prints.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..integrations.hf import fused_head_transform
from ..losses import REFERENCE_LOSS_TYPES
from .checkpoint import CHECKPOINT_PREFIX, METRICS_FILE, find_checkpoint, kept_history
from .config import TrainConfig
from .data import PreferencePair, special_tokens, tokenize_pairs
from .dataset import PreferenceData, indexed_batch, load_pairs, micro_batch_indices
from .evaluate import ScoreFn, evaluate_preferences, generate_greedy, generation_metrics
from .metrics import Window, epoch, format_metrics
from .models import (
    autocast_dtype,
    build_optimizer,
    describe,
    limited_threads,
    load_model,
    thread_count,
)
from .parallel import World, joined_world, shared_reference
from .sharding import ParallelPolicy
from .step import batch_loss, reference_logprobs
from .task import case_task_score

# re-exported: they were defined here before models.py and metrics.py held them
__all__ = ["TrainResult", "autocast_dtype", "format_metrics", "limited_threads", "load_model"]
__all__ += ["train"]


@dataclass
class TrainResult:
    """What a run returns: the trained model and its metrics, as in metrics.jsonl.

    Under ``distributed`` every rank returns one (the same metrics; ``rank`` says whose);
    under fsdp ``model`` is this rank's sharded model, the checkpoint holds it whole.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    step: int
    train_log: list[dict[str, Any]]
    eval_log: list[dict[str, Any]]
    checkpoint: Path
    seconds: float
    rank: int = 0


def train(
    config: TrainConfig,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    train_pairs: Sequence[PreferencePair] | None = None,
    eval_pairs: Sequence[PreferencePair] | None = None,
    score_fn: ScoreFn | None = None,
) -> TrainResult:
    """Run preference training as ``config`` says and return the model and its metrics.

    Args:
        config: the run's settings.
        model, tokenizer: an already-built policy and its tokenizer, used instead of
            ``config.model`` and trained in place.
        train_pairs, eval_pairs: pairs used instead of the config's data source (both
            must be given together).
        score_fn: ``score_fn(prompt, completion) -> float`` scoring the greedy completions
            of held-out prompts (reported as ``task_score``); the embedded task's scorer
            when its data is used.

    Returns:
        TrainResult with the trained model, the train and eval lines of metrics.jsonl
        and the final checkpoint.

    Under ``distributed="ddp"`` or ``"fsdp"`` every rank of a torchrun launch calls it
    with the same arguments; the ranks split each micro-batch, and rank 0 alone writes
    metrics.jsonl and the checkpoints and prints.

    Raises:
        ValueError: naming what is wrong, for bad data rows, paths or settings (on every
            rank of a distributed run).
    """
    with limited_threads(thread_count(config, model)), joined_world(config) as world:
        return _train(config, world, model, tokenizer, train_pairs, eval_pairs, score_fn)


def _train(
    config: TrainConfig,
    world: World,
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    train_pairs: Sequence[PreferencePair] | None,
    eval_pairs: Sequence[PreferencePair] | None,
    score_fn: ScoreFn | None,
) -> TrainResult:
    started = time.perf_counter()
    if (train_pairs is None) != (eval_pairs is None):
        raise ValueError("train_pairs, eval_pairs: give both or neither")
    device = world.device
    amp = autocast_dtype(config.precision, device)
    torch.manual_seed(config.seed)

    if train_pairs is None:
        train_pairs, eval_pairs = load_pairs(config)
        if config.train_file is None and score_fn is None:
            score_fn = case_task_score
    if not train_pairs:
        raise ValueError("train_pairs: expected at least one training pair")
    policy, tokenizer = load_model(config, model, tokenizer)
    if config.fused_head:
        fused_head_transform(policy)  # refuses a head it cannot form, before any step
    policy.to(device)
    pad = special_tokens(tokenizer).pad
    train_data = PreferenceData(
        list(train_pairs),
        tokenize_pairs(train_pairs, tokenizer, config.max_length, config.max_prompt_length),
    )
    eval_data = PreferenceData(
        list(eval_pairs),
        tokenize_pairs(eval_pairs, tokenizer, config.max_length, config.max_prompt_length),
    )
    if config.progress and world.main:
        print(describe(policy, config, len(train_data), len(eval_data)))

    # the reference is the policy as it starts, so it is taken before a resume loads weights
    # (and before sharding: precompute_ref scores with the whole model on every rank)
    reference_model = None
    if config.loss_type in REFERENCE_LOSS_TYPES:
        if config.precompute_ref:
            for data in (train_data, eval_data):
                if len(data):
                    data.reference = shared_reference(
                        world, policy, data, config.batch_size, pad, amp, config.fused_head
                    )
        else:
            reference_model = copy.deepcopy(policy).eval().requires_grad_(False)

    trained = ParallelPolicy(world, policy, reference_model, amp, config.fused_head)
    optimizer, scheduler = build_optimizer(policy, config)
    output_dir = Path(config.output_dir)
    metrics_path = output_dir / METRICS_FILE
    step = 0
    history: list[dict[str, Any]] = []
    if config.resume is not None:
        # rank 0 picks the checkpoint ("latest" could differ between ranks that look at
        # different moments) and reads the history, which it rewrites below
        checkpoint = world.from_main(lambda: find_checkpoint(config.resume, output_dir))
        step = trained.load(checkpoint, optimizer, scheduler)
        history = world.from_main(lambda: kept_history(metrics_path, step))
    if world.main:
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(line) + "\n" for line in history))

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if world.main:
            with metrics_path.open("a") as out:
                out.write(json.dumps(record) + "\n")

    def evaluate_now() -> None:
        # every rank evaluates the whole held-out set (a sharded model needs all of them
        # in each forward); the values agree, rank 0's are written
        if not len(eval_data):
            return
        record: dict[str, Any] = {"split": "eval", "step": step}
        record |= evaluate_preferences(policy, eval_data, config, pad, reference_model, amp)
        if config.generate_size:
            generations = generate_greedy(
                policy,
                tokenizer,
                [p.prompt for p in eval_data.pairs[: config.generate_size]],
                max_new_tokens=config.max_new_tokens,
                max_prompt_length=config.max_prompt_length,
                batch_size=config.batch_size,
                amp=amp,
                synced=config.distributed == "fsdp",
            )
            record |= generation_metrics(generations, score_fn)
        trained.reshard()
        log(record)
        if config.progress and world.main:
            tqdm.write(f"step {step:>5} eval   {format_metrics(record)}")

    show = config.progress and world.main
    bar = tqdm(total=config.max_steps, initial=step, disable=not show, desc="train")
    window = Window()
    last_checkpoint: Path | None = None
    accumulation = config.gradient_accumulation_steps
    while step < config.max_steps:
        trained.train()
        step_started = time.perf_counter()
        for micro in range(accumulation):
            indices = micro_batch_indices(
                len(train_data), config.batch_size, config.seed, step * accumulation + micro
            )
            batch = indexed_batch(train_data, world.share(indices), pad, device)
            reference = reference_logprobs(
                batch, train_data, reference_model, amp, config.fused_head
            )
            with trained.micro_batch(last=micro == accumulation - 1):
                out = batch_loss(trained.forward(batch), batch, reference, config)
                (out.loss / accumulation).backward()
            window.add(out, tokens=int(batch["attention_mask"].sum()))
        # an infinite limit measures the norm without clipping
        limit = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        window.grad_norms.append(trained.clip_gradients(limit))
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.seconds += time.perf_counter() - step_started
        bar.update(1)

        if step % config.logging_steps == 0 or step == config.max_steps:
            record = {"split": "train", "step": step}
            record["epoch"] = epoch(step, config, len(train_data))
            record |= window.summary(world.sums) | {"learning_rate": learning_rate}
            log(record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                acc=f"{record['accuracy']:.2f}",
                margin=f"{record['margin']:.3f}",
            )
            window = Window()
        if config.eval_steps and step % config.eval_steps == 0 and step < config.max_steps:
            evaluate_now()
        if config.save_steps and step % config.save_steps == 0:
            last_checkpoint = trained.save(
                output_dir, tokenizer, optimizer, scheduler, step, config
            )
    bar.close()
    evaluate_now()
    if last_checkpoint is None or last_checkpoint.name != f"{CHECKPOINT_PREFIX}{step}":
        last_checkpoint = trained.save(output_dir, tokenizer, optimizer, scheduler, step, config)
    return TrainResult(
        model=policy,
        tokenizer=tokenizer,
        step=step,
        train_log=[r for r in history if r["split"] == "train"],
        eval_log=[r for r in history if r["split"] == "eval"],
        checkpoint=last_checkpoint,
        seconds=time.perf_counter() - started,
        rank=world.rank,
    )
