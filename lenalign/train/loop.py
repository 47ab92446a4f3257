"""The training run: ``train(config)`` from data and models to metrics and checkpoints.

With the default config it trains the embedded tiny Llama on the embedded case task,
offline, in seconds on a CPU. The loss of each step is ``lenalign.train.step``'s; this
module owns what surrounds it: the models, the optimizer and its schedule, gradient
accumulation and clipping, logging, evaluation and checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..integrations.hf import fused_head_transform
from ..losses import REFERENCE_LOSS_TYPES, PreferenceLossOutput
from .checkpoint import (
    CHECKPOINT_PREFIX,
    METRICS_FILE,
    find_checkpoint,
    kept_history,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .data import PreferencePair, special_tokens, tokenize_pairs
from .dataset import PreferenceData, indexed_batch, load_pairs, micro_batch_indices
from .evaluate import ScoreFn, evaluate_preferences, generate_greedy, generation_metrics
from .step import batch_loss, forward_outputs, precompute_reference, reference_logprobs
from .task import case_task_score
from .tiny import build_byte_tokenizer, build_tiny_llama


@dataclass
class TrainResult:
    """What a run returns: the trained model and its metrics, as in metrics.jsonl."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    step: int
    train_log: list[dict[str, Any]]
    eval_log: list[dict[str, Any]]
    checkpoint: Path
    seconds: float


class _Window:
    """Training metrics accumulated between two logging steps."""

    per_pair = ("chosen_rewards", "rejected_rewards", "margins", "accuracies")
    per_pair += ("chosen_lengths", "rejected_lengths")

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {name: [] for name in self.per_pair}
        self.loss = 0.0
        self.pairs = 0
        self.tokens = 0
        self.seconds = 0.0
        self.grad_norms: list[float] = []

    def add(self, out: PreferenceLossOutput, tokens: int) -> None:
        n_pairs = out.margins.shape[0]
        self.loss += float(out.loss.detach()) * n_pairs
        self.pairs += n_pairs
        self.tokens += tokens
        for name in self.per_pair:
            self.values[name].append(getattr(out, name).float())

    def summary(self) -> dict[str, float]:
        means = {name: float(torch.cat(v).mean()) for name, v in self.values.items()}
        return {
            "loss": self.loss / self.pairs,
            "chosen_reward": means["chosen_rewards"],
            "rejected_reward": means["rejected_rewards"],
            "margin": means["margins"],
            "accuracy": means["accuracies"],
            "chosen_length": means["chosen_lengths"],
            "rejected_length": means["rejected_lengths"],
            "grad_norm": float(np.mean(self.grad_norms)),
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
        }


def _lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then a cosine decay towards 0 at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(model: PreTrainedModel, config: TrainConfig) -> torch.optim.AdamW:
    # decaying gains and biases towards 0 only hurts; the usual rule spares every 1-D tensor
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` setting on ``device``; None for plain fp32."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return torch.bfloat16 if precision == "bf16" else None


def load_model(
    config: TrainConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy to train (fp32 weights) and its tokenizer, as the config names them.

    An already-built ``model`` (with its ``tokenizer``) is used as given and trained in
    place; else ``config.model`` is loaded from its local directory; else the embedded
    tiny Llama is built from ``config.seed`` with the byte tokenizer (or ``tokenizer``).
    Nothing is fetched from a hub.
    """
    if model is not None:
        if config.model is not None:
            raise ValueError("model: given both in the config and as a model object")
        if tokenizer is None:
            raise ValueError("tokenizer: a model object must come with its tokenizer")
        return model, tokenizer
    if config.model is None:
        tokenizer = build_byte_tokenizer() if tokenizer is None else tokenizer
        return build_tiny_llama(tokenizer, config.seed), tokenizer
    # local directories only: a hub name would mean a download, which this trainer never does
    for name, path in (("model", config.model), ("tokenizer", config.tokenizer)):
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"{name}: {path} is not a local directory")
    if tokenizer is None:
        source = config.tokenizer or config.model
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(config.model, local_files_only=True)
    return loaded.to(torch.float32), tokenizer


def _describe(model: PreTrainedModel, config: TrainConfig, n_train: int, n_eval: int) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    source = config.model or "embedded tiny Llama"
    data = config.train_file or "embedded synthetic case task"
    return (
        f"model {source} ({type(model).__name__}, {n_params / 1e6:.3g}M parameters)\n"
        f"data  {data}: {n_train} training pairs, {n_eval} held-out\n"
        f"loss  {config.loss_type}, beta {config.beta}, length_normalization "
        f"{config.length_normalization}"
    )


def format_metrics(record: dict[str, Any]) -> str:
    """A metrics.jsonl record's headline numbers on one line, as a run prints them."""
    shown = ("loss", "accuracy", "margin", "gen_length", "task_score")
    return "  ".join(f"{name} {record[name]:.3f}" for name in shown if name in record)


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

    Raises:
        ValueError: naming what is wrong, for bad data rows, paths or settings.
    """
    with limited_threads(_thread_count(config, model)):
        return _train(config, model, tokenizer, train_pairs, eval_pairs, score_fn)


def _thread_count(config: TrainConfig, model: PreTrainedModel | None) -> int:
    if config.cpu_threads:
        return config.cpu_threads
    # the tiny model's matrices are too small to gain from splitting an op across threads,
    # and split ops stall whenever another process holds one of the cores (tens of times
    # slower on a busy 2-core machine)
    if config.model is None and model is None:
        return 1
    return torch.get_num_threads()


@contextmanager
def limited_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(
    config: TrainConfig,
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    train_pairs: Sequence[PreferencePair] | None,
    eval_pairs: Sequence[PreferencePair] | None,
    score_fn: ScoreFn | None,
) -> TrainResult:
    started = time.perf_counter()
    if (train_pairs is None) != (eval_pairs is None):
        raise ValueError("train_pairs, eval_pairs: give both or neither")
    device = _resolve_device(config.device)
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

    # the reference is the policy as it starts, so it is taken before a resume loads weights
    reference_model = None
    if config.loss_type in REFERENCE_LOSS_TYPES:
        if config.precompute_ref:
            for data in (train_data, eval_data):
                if len(data):
                    data.reference = precompute_reference(
                        policy, data, config.batch_size, pad, amp, config.fused_head
                    )
        else:
            reference_model = copy.deepcopy(policy).eval().requires_grad_(False)

    optimizer = _optimizer(policy, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.warmup_steps, config.max_steps)
    )
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / METRICS_FILE
    step = 0
    history: list[dict[str, Any]] = []
    if config.resume is not None:
        checkpoint = find_checkpoint(config.resume, output_dir)
        step = load_checkpoint(checkpoint, policy, optimizer, scheduler)
        history = kept_history(metrics_path, step)
    metrics_path.write_text("".join(json.dumps(line) + "\n" for line in history))

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        with metrics_path.open("a") as out:
            out.write(json.dumps(record) + "\n")

    def evaluate_now() -> None:
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
            )
            record |= generation_metrics(generations, score_fn)
        log(record)
        if config.progress:
            tqdm.write(f"step {step:>5} eval   {format_metrics(record)}")

    if config.progress:
        print(_describe(policy, config, len(train_data), len(eval_data)))
    bar = tqdm(total=config.max_steps, initial=step, disable=not config.progress, desc="train")
    window = _Window()
    last_checkpoint: Path | None = None
    accumulation = config.gradient_accumulation_steps
    while step < config.max_steps:
        policy.train()
        step_started = time.perf_counter()
        for micro in range(accumulation):
            indices = micro_batch_indices(
                len(train_data), config.batch_size, config.seed, step * accumulation + micro
            )
            batch = indexed_batch(train_data, indices, pad, device)
            reference = reference_logprobs(
                batch, train_data, reference_model, amp, config.fused_head
            )
            outputs = forward_outputs(policy, batch, amp, config.fused_head)
            out = batch_loss(outputs, batch, reference, config)
            (out.loss / accumulation).backward()
            window.add(out, tokens=int(batch["attention_mask"].sum()))
        # an infinite limit measures the norm without clipping
        limit = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        window.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(policy.parameters(), limit)))
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.seconds += time.perf_counter() - step_started
        bar.update(1)

        if step % config.logging_steps == 0 or step == config.max_steps:
            record = {"split": "train", "step": step, "epoch": _epoch(step, config, train_data)}
            record |= window.summary() | {"learning_rate": learning_rate}
            log(record)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                acc=f"{record['accuracy']:.2f}",
                margin=f"{record['margin']:.3f}",
            )
            window = _Window()
        if config.eval_steps and step % config.eval_steps == 0 and step < config.max_steps:
            evaluate_now()
        if config.save_steps and step % config.save_steps == 0:
            last_checkpoint = save_checkpoint(
                output_dir, policy, tokenizer, optimizer, scheduler, step, config
            )
    bar.close()
    evaluate_now()
    if last_checkpoint is None or last_checkpoint.name != f"{CHECKPOINT_PREFIX}{step}":
        last_checkpoint = save_checkpoint(
            output_dir, policy, tokenizer, optimizer, scheduler, step, config
        )
    return TrainResult(
        model=policy,
        tokenizer=tokenizer,
        step=step,
        train_log=[r for r in history if r["split"] == "train"],
        eval_log=[r for r in history if r["split"] == "eval"],
        checkpoint=last_checkpoint,
        seconds=time.perf_counter() - started,
    )


def _epoch(step: int, config: TrainConfig, data: PreferenceData) -> float:
    pairs_seen = step * config.gradient_accumulation_steps * config.batch_size
    return pairs_seen / len(data)
