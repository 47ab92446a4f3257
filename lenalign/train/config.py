"""The trainer's settings: ``TrainConfig``, its checks, and config files.

Every field is a ``lenalign train`` flag (``lenalign.train.cli``) and a key of a JSON or
YAML config file; docs/trainer.md documents them. A config is checked whole when it is
made, so a bad value fails before any model loads.
"""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..checks import check_choice, check_int, fail
from ..losses import LOSS_TYPES, REFERENCE_LOSS_TYPES, preference_loss
from ..outputs import SequenceLogProbs

PRECISIONS = ("auto", "bf16", "fp32")
# "none": one process; "ddp" and "fsdp": one process per rank, launched by torchrun
DISTRIBUTED_MODES = ("none", "ddp", "fsdp")


def _option(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Every setting of a training run; each field is also a ``lenalign train`` flag.

    The defaults train the embedded tiny Llama on the embedded synthetic task (see
    docs/trainer.md); a real model needs at least ``model``, ``train_file`` and a much
    smaller ``learning_rate``. Invalid values raise ValueError naming the field.
    """

    # model and data
    model: str | None = _option(
        None, "local directory of a Hugging Face causal LM; default: the embedded tiny Llama"
    )
    tokenizer: str | None = _option(None, "local tokenizer directory; default: the model's")
    train_file: str | None = _option(
        None, "JSONL of prompt/chosen/rejected pairs; default: the embedded synthetic task"
    )
    eval_file: str | None = _option(
        None, "JSONL of held-out pairs; default: eval_size pairs split off the training data"
    )
    synthetic_size: int = _option(4096, "training pairs drawn from the embedded synthetic task")
    eval_size: int = _option(128, "held-out pairs evaluated (0: no evaluation)")
    max_length: int = _option(512, "tokens per row (prompt + completion) after truncation")
    max_prompt_length: int = _option(256, "prompt tokens kept when a row must be truncated")
    # loss
    loss_type: str = _option("sigmoid", f"one of {', '.join(LOSS_TYPES)}")
    beta: float = _option(0.1, "inverse temperature of the implicit rewards")
    length_normalization: str | float = _option(
        "sum", "'sum', 'mean' or lambda in [0, 1]: scores are sum / count**lambda"
    )
    gamma: float = _option(0.0, "simpo target margin")
    alpha: float = _option(0.0, "rdpo weight of the length difference")
    label_smoothing: float = _option(0.0, "sigmoid label-flip probability (cDPO)")
    sft_weight: float = _option(0.0, "weight of the chosen completions' token-mean NLL")
    precompute_ref: bool = _option(
        False, "compute reference log-probs once before training instead of keeping a model"
    )
    fused_head: bool = _option(
        False,
        "score the LM head's input with linear_sequence_logprobs: the logits are never formed",
    )
    # optimization
    max_steps: int = _option(200, "optimizer steps")
    batch_size: int = _option(16, "pairs per micro-batch (2x rows per forward pass)")
    gradient_accumulation_steps: int = _option(1, "micro-batches per optimizer step")
    learning_rate: float = _option(1e-3, "peak AdamW learning rate")
    weight_decay: float = _option(0.0, "AdamW weight decay of matrices (not norms, biases)")
    warmup_steps: int = _option(10, "steps of linear warmup before the cosine decay")
    max_grad_norm: float = _option(1.0, "gradient clipping norm (0: no clipping)")
    seed: int = _option(0, "seed of model init, synthetic data, data order and dropout")
    device: str = _option("auto", "torch device; auto: cuda if available, else cpu")
    cpu_threads: int = _option(
        0, "torch CPU threads during the run; 0: 1 for the embedded model, else torch's default"
    )
    precision: str = _option("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    distributed: str = _option(
        "none", "none, or under torchrun ddp (DistributedDataParallel) or fsdp (FSDP2)"
    )
    distributed_timeout: int = _option(
        600, "seconds a rank waits in a collective before failing (ddp, fsdp)"
    )
    # logging, evaluation, checkpoints
    output_dir: str = _option("runs/train", "where metrics.jsonl and checkpoints go")
    logging_steps: int = _option(10, "steps between two lines of metrics.jsonl")
    eval_steps: int = _option(50, "steps between evaluations (0: only at the end)")
    generate_size: int = _option(32, "held-out prompts completed greedily at each evaluation")
    max_new_tokens: int = _option(32, "token limit of each greedy completion")
    save_steps: int = _option(0, "steps between checkpoints (0: only the final one)")
    resume: str | None = _option(
        None, "checkpoint directory to continue from, or 'latest' in output_dir"
    )
    progress: bool = _option(True, "show a progress bar and print evaluations")

    def __post_init__(self) -> None:
        for option in fields(self):
            setattr(self, option.name, _check_type(option, getattr(self, option.name)))
        self._check_values()

    def _check_values(self) -> None:
        positive = ("synthetic_size", "max_steps", "batch_size", "gradient_accumulation_steps")
        positive += ("logging_steps", "max_new_tokens", "distributed_timeout")
        for name in positive:
            check_int(name, getattr(self, name), minimum=1)
        non_negative = ("eval_size", "eval_steps", "generate_size", "save_steps", "warmup_steps")
        for name in (*non_negative, "cpu_threads"):
            check_int(name, getattr(self, name), minimum=0)
        # written as "not >= 0" so that a NaN fails too
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                fail(name, "a number >= 0", getattr(self, name))
        if not self.learning_rate > 0:
            fail("learning_rate", "a number > 0", self.learning_rate)
        check_int("max_length", self.max_length, minimum=2)
        if not 1 <= self.max_prompt_length < self.max_length:
            expected = f"1 <= max_prompt_length < max_length ({self.max_length})"
            fail("max_prompt_length", expected, self.max_prompt_length)
        if self.model is None and self.tokenizer is not None:
            raise ValueError("tokenizer: only with model; the embedded model has its own")
        if self.train_file is None and self.eval_file is not None:
            raise ValueError("eval_file: only with train_file; the embedded task makes its own")
        check_choice("precision", self.precision, PRECISIONS)
        # the launch environment and the world size are checked when a run starts
        # (lenalign.train.parallel), as a config is also read where no run is launched
        check_choice("distributed", self.distributed, DISTRIBUTED_MODES)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"device: {error}") from None
        if self.precompute_ref and self.loss_type not in REFERENCE_LOSS_TYPES:
            raise ValueError(f"precompute_ref: loss_type={self.loss_type!r} uses no reference")
        _check_loss_options(self)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """The config of a JSON or YAML file of field values, ``overrides`` winning."""
        return cls(**{**read_config_file(path), **overrides})


# how each annotation is checked: the expected value kinds and their description
_TYPE_CHECKS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
    "str | None": ((str, type(None)), "a string or null"),
    "str | float": ((str, int, float), "'sum', 'mean' or a number"),
}


def _check_type(option: Any, value: Any) -> Any:
    kinds, description = _TYPE_CHECKS[option.type]
    # bool is an int subclass, and True as a step count is a slip, not a 1
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        fail(option.name, description, repr(value))
    if option.type == "float":
        return float(value)
    return value


def _check_loss_options(config: TrainConfig) -> None:
    """Run the loss once on a dummy pair, so bad loss options fail before any model loads.

    ``preference_loss`` owns the rules (ranges, which option goes with which loss_type);
    asking it keeps one copy of them.
    """
    dummy = SequenceLogProbs(
        sum=torch.zeros(1), mean=torch.zeros(1), count=torch.ones(1, dtype=torch.int64)
    )
    reference = (dummy, dummy) if config.loss_type in REFERENCE_LOSS_TYPES else (None, None)
    preference_loss(dummy, dummy, *reference, **loss_options(config))


def loss_options(config: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of ``preference_loss`` that the config sets."""
    names = ("loss_type", "beta", "length_normalization", "gamma", "alpha", "label_smoothing")
    return {name: getattr(config, name) for name in (*names, "sft_weight")}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Field values from a ``.json``, ``.yaml`` or ``.yml`` file holding one mapping.

    Raises:
        ValueError: for another suffix, a file that is not a mapping, or unknown keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: no such file {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        values = json.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml  # only config files need it

        values = yaml.safe_load(text)
        if isinstance(values, dict):
            values = _yaml_exponent_floats(values)
    else:
        raise ValueError(f"config: expected a .json, .yaml or .yml file, got {path}")
    if not isinstance(values, dict):
        raise ValueError(f"config: {path} must hold a mapping of field names to values")
    unknown = sorted(set(values) - {option.name for option in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"config: {path} has unknown fields {', '.join(unknown)}")
    return values


def _yaml_exponent_floats(values: dict[str, Any]) -> dict[str, Any]:
    """Read float fields such as ``learning_rate: 1e-6`` as numbers.

    YAML 1.1, which PyYAML follows, takes an exponent without a dot for a string.
    """
    floats = {option.name for option in fields(TrainConfig) if option.type == "float"}
    converted = dict(values)
    for name in floats & set(values):
        # a string that is no number is left as it is, for TrainConfig to report
        if isinstance(values[name], str):
            with suppress(ValueError):
                converted[name] = float(values[name])
    return converted
