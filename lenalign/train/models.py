"""What a run trains with: the policy and its tokenizer, the optimizer and its schedule,
the device, the precision and the CPU threads.

``lenalign.train.loop`` puts them together; they are separate functions so that each
reads on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .config import TrainConfig
from .tiny import build_byte_tokenizer, build_tiny_llama


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then a cosine decay towards 0 at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(max_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters of ``model`` and its warmup-cosine schedule.

    Under FSDP2 ``model`` is the sharded one: the optimizer holds (and steps) the shards.
    """
    # decaying gains and biases towards 0 only hurts; the usual rule spares every 1-D tensor
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.max_steps)
    )
    return optimizer, scheduler


def resolve_device(name: str) -> torch.device:
    """The torch device of a ``device`` setting; auto: cuda if available, else cpu."""
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


def describe(model: PreTrainedModel, config: TrainConfig, n_train: int, n_eval: int) -> str:
    """The lines a run prints first: the model, the data and the loss."""
    n_params = sum(p.numel() for p in model.parameters())
    source = config.model or "embedded tiny Llama"
    data = config.train_file or "embedded synthetic case task"
    return (
        f"model {source} ({type(model).__name__}, {n_params / 1e6:.3g}M parameters)\n"
        f"data  {data}: {n_train} training pairs, {n_eval} held-out\n"
        f"loss  {config.loss_type}, beta {config.beta}, length_normalization "
        f"{config.length_normalization}"
    )


def thread_count(config: TrainConfig, model: PreTrainedModel | None) -> int:
    """The torch CPU threads of a run (``cpu_threads``; 0 picks them)."""
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
