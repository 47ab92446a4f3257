"""Reference trainer: preference training of a Hugging Face causal LM through the fused loss.

One optimizer step is the code to copy from (see ``batch_loss``)::

    batch = collate_pairs(pairs, pad)        # 2B rows: B chosen, then B rejected
    logits = policy(input_ids, attention_mask).logits            # one forward, [2B, T, V]
    logps = sequence_logprobs(logits, input_ids, completion_mask, shift=True)
    out = preference_loss(chosen half, rejected half, reference halves, loss_type=...)
    out.loss.backward(); clip; AdamW step; warmup-cosine schedule step

With ``fused_head`` the backbone's hidden states and the LM head's weight go to
``linear_sequence_logprobs`` instead, and the logits are never formed.

``train(config)`` runs the whole thing (data, reference model, logging, evaluation,
checkpoints) and returns its metrics; ``main(argv)`` is ``lenalign train``. With the
default config it trains the embedded tiny Llama on the embedded synthetic task, offline,
in seconds on a CPU. docs/trainer.md documents every config field.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .api import linear_sequence_logprobs, sequence_logprobs
from .losses import (
    LOSS_TYPES,
    REFERENCE_LOSS_TYPES,
    PreferenceLossOutput,
    preference_loss,
    split_pairs,
)
from .outputs import SequenceLogProbs
from .synthetic import case_task_score, make_case_pairs
from .tiny import build_byte_tokenizer, build_tiny_llama
from .train_data import (
    PreferencePair,
    TokenizedPair,
    collate_pairs,
    encode_prompt,
    load_preference_jsonl,
    special_tokens,
    tokenize_pairs,
)

PRECISIONS = ("auto", "bf16", "fp32")
METRICS_FILE = "metrics.jsonl"
TRAINER_STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
CHECKPOINT_PREFIX = "checkpoint-"

ScoreFn = Callable[[str, str], float]
PairLogProbs = tuple[SequenceLogProbs, SequenceLogProbs]


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
        positive += ("logging_steps", "max_new_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        non_negative = ("eval_size", "eval_steps", "generate_size", "save_steps", "warmup_steps")
        for name in (*non_negative, "cpu_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: expected a number > 0, got {self.learning_rate}")
        if self.max_length < 2:
            raise ValueError(f"max_length: expected an integer >= 2, got {self.max_length}")
        if not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(
                f"max_prompt_length: expected 1 <= max_prompt_length < max_length "
                f"({self.max_length}), got {self.max_prompt_length}"
            )
        if self.model is None and self.tokenizer is not None:
            raise ValueError("tokenizer: only with model; the embedded model has its own")
        if self.train_file is None and self.eval_file is not None:
            raise ValueError("eval_file: only with train_file; the embedded task makes its own")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
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
        raise ValueError(f"{option.name}: expected {description}, got {value!r}")
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


# ----------------------------------------------------------------------------- the step


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` setting on ``device``; None for plain fp32."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return torch.bfloat16 if precision == "bf16" else None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_logits(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], amp: torch.dtype | None = None
) -> torch.Tensor:
    """The model's [2B, T, V] logits of a collated batch, under autocast when ``amp`` is set."""
    device = batch["input_ids"].device
    with _autocast(device, amp):
        outputs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
    return outputs.logits


@dataclass(frozen=True)
class HeadInput:
    """What the LM head receives, for ``linear_sequence_logprobs``: [2B, T, H] hidden
    states, the head's [V, H] weight and [V] bias or None, and the keyword arguments that
    reproduce the model's scaling and capping of its logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: dict[str, float | None]


# config fields by which some architectures change the head's output, in ways that
# linear_sequence_logprobs does not reproduce (Granite, Falcon-H1, Muse, HyperCLOVA X)
UNSUPPORTED_LOGIT_TRANSFORMS = ("logits_scaling", "output_multiplier", "lm_head_multiplier")


def fused_head_transform(model: PreTrainedModel) -> dict[str, float | None]:
    """``linear_sequence_logprobs``'s logit_scale and logit_softcap for ``model``'s head.

    Cohere multiplies its logits by ``config.logit_scale``; the Gemma family caps them
    with ``config.final_logit_softcapping``. A head that is not an ``nn.Linear``, or a
    config with any other logit transform, is refused: its logits would not be formed.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        kind = type(head).__name__
        raise ValueError(f"fused_head: expected a model whose LM head is nn.Linear, got {kind}")
    text_config = model.config.get_text_config()
    for name in UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1:
            raise ValueError(
                f"fused_head: expected a model whose logits are (hidden @ W.T + b) scaled by "
                f"logit_scale and capped by final_logit_softcapping, got one with "
                f"{name}={value}; train it with fused_head off"
            )
    scale = getattr(text_config, "logit_scale", None)
    return {
        "logit_scale": 1.0 if scale is None else float(scale),
        "logit_softcap": getattr(text_config, "final_logit_softcapping", None),
    }


def forward_head_input(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], amp: torch.dtype | None = None
) -> HeadInput:
    """The hidden states entering the model's LM head, with the head's parameters.

    Under autocast the head's matmul would run in ``amp``: the three are cast to it here,
    since ``linear_sequence_logprobs`` forms the logits in its inputs' dtype.
    """
    transform = fused_head_transform(model)
    device = batch["input_ids"].device
    with _autocast(device, amp):
        outputs = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
    head = model.get_output_embeddings()
    parts = (outputs.last_hidden_state, head.weight, head.bias)
    if amp is not None:
        parts = tuple(None if part is None else part.to(amp) for part in parts)
    return HeadInput(*parts, transform)


def forward_outputs(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    amp: torch.dtype | None,
    fused_head: bool,
) -> torch.Tensor | HeadInput:
    """The logits, or with ``fused_head`` the head's input, of a collated batch."""
    if fused_head:
        return forward_head_input(model, batch, amp)
    return forward_logits(model, batch, amp)


def completion_logprobs(
    outputs: torch.Tensor | HeadInput, batch: dict[str, torch.Tensor]
) -> PairLogProbs:
    """Completion log-likelihoods of a batch's chosen and rejected rows.

    From the logits as the model returned them (``shift=True`` scores the token at t with
    the logits at t - 1, so nothing is sliced or copied), or from the head's input.
    """
    labels, mask = batch["input_ids"], batch["completion_mask"]
    if isinstance(outputs, HeadInput):
        logps = linear_sequence_logprobs(
            outputs.hidden,
            outputs.weight,
            labels,
            mask,
            bias=outputs.bias,
            shift=True,
            **outputs.transform,
        )
    else:
        logps = sequence_logprobs(outputs, labels, mask, shift=True)
    return split_pairs(logps)


def batch_loss(
    outputs: torch.Tensor | HeadInput,
    batch: dict[str, torch.Tensor],
    reference: PairLogProbs | None,
    config: TrainConfig,
) -> PreferenceLossOutput:
    """The preference loss of one batch from the policy's logits (or head input, see
    ``forward_outputs``); differentiable in them.

    ``reference`` holds the reference model's (chosen, rejected) log-probs of the same
    rows, or is None for a reference-free loss_type.
    """
    chosen, rejected = completion_logprobs(outputs, batch)
    ref_chosen, ref_rejected = reference if reference is not None else (None, None)
    return preference_loss(chosen, rejected, ref_chosen, ref_rejected, **loss_options(config))


# ----------------------------------------------------------------------------- data


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


def _batch(
    data: PreferenceData, indices: Sequence[int], pad: int, device: torch.device
) -> dict[str, torch.Tensor]:
    batch = collate_pairs([data.rows[i] for i in indices], pad)
    batch["index"] = torch.tensor(indices, dtype=torch.int64)
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _in_order(
    data: PreferenceData, batch_size: int, pad: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(data), batch_size):
        yield _batch(data, range(start, min(start + batch_size, len(data))), pad, device)


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


@torch.no_grad()
def precompute_reference(
    model: PreTrainedModel,
    data: PreferenceData,
    batch_size: int,
    pad: int,
    amp: torch.dtype | None = None,
    fused_head: bool = False,
) -> PairLogProbs:
    """Reference (chosen, rejected) log-probs of every pair of ``data``, [N] each."""
    device = next(model.parameters()).device
    parts = [
        completion_logprobs(forward_outputs(model, batch, amp, fused_head), batch)
        for batch in _in_order(data, batch_size, pad, device)
    ]

    def stacked(side: int) -> SequenceLogProbs:
        columns = zip(*(part[side][:3] for part in parts), strict=True)
        return SequenceLogProbs(*(torch.cat(column) for column in columns))

    return stacked(0), stacked(1)


def _reference_for(
    batch: dict[str, torch.Tensor],
    data: PreferenceData,
    reference_model: PreTrainedModel | None,
    amp: torch.dtype | None,
    fused_head: bool,
) -> PairLogProbs | None:
    if data.reference is not None:
        index = batch["index"]
        chosen, rejected = data.reference
        return (
            SequenceLogProbs(*(f[index] for f in chosen[:3])),
            SequenceLogProbs(*(f[index] for f in rejected[:3])),
        )
    if reference_model is None:
        return None
    with torch.no_grad():
        return completion_logprobs(forward_outputs(reference_model, batch, amp, fused_head), batch)


# ----------------------------------------------------------------------------- evaluation


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
) -> list[Generation]:
    """Greedy completions of ``prompts``, encoded as in training (BOS, end kept).

    Prompts are left-padded in batches so that every completion starts right after its
    prompt. The model is put in eval mode and left there.
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
        with _autocast(device, amp):
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=settings,
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
    for batch in _in_order(data, config.batch_size, pad, device):
        reference = _reference_for(batch, data, reference_model, amp, config.fused_head)
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


# ----------------------------------------------------------------------------- the run


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


def find_checkpoint(resume: str, output_dir: str | Path) -> Path:
    """The checkpoint directory that ``resume`` names ('latest': the last in output_dir)."""
    if resume == "latest":
        steps = {
            int(p.name.removeprefix(CHECKPOINT_PREFIX)): p
            for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
            if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
        }
        found = [steps[s] for s in sorted(steps)]
        if not found:
            raise ValueError(f"resume: no {CHECKPOINT_PREFIX}* directory in {output_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise ValueError(f"resume: {path} is not a checkpoint (no {TRAINER_STATE_FILE})")
    return path


def save_checkpoint(
    directory: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    config: TrainConfig,
) -> Path:
    """Write ``directory/checkpoint-<step>``: a model and tokenizer directory that
    ``from_pretrained`` loads, plus the optimizer, schedule and RNG state to resume from."""
    path = directory / f"{CHECKPOINT_PREFIX}{step}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, path / TRAINER_STATE_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    return path


def _load_checkpoint(
    path: Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Restore a checkpoint's weights into ``model`` and its states; return its step."""
    saved = type(model).from_pretrained(path, local_files_only=True)
    model.load_state_dict(saved.state_dict())
    del saved
    state = torch.load(path / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


def _kept_history(metrics_path: Path, step: int) -> list[dict[str, Any]]:
    """The metrics.jsonl lines of a resumed run up to its checkpoint's ``step``.

    Lines past it came from the part of the run that the resume replays.
    """
    if not metrics_path.is_file():
        return []
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    return [line for line in lines if line["step"] <= step]


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


def _format_metrics(record: dict[str, Any]) -> str:
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
    with cpu_threads(_thread_count(config, model)):
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
def cpu_threads(count: int) -> Iterator[None]:
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
        step = _load_checkpoint(checkpoint, policy, optimizer, scheduler)
        history = _kept_history(metrics_path, step)
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
            tqdm.write(f"step {step:>5} eval   {_format_metrics(record)}")

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
            batch = _batch(train_data, indices, pad, device)
            reference = _reference_for(batch, train_data, reference_model, amp, config.fused_head)
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


# ----------------------------------------------------------------------------- command line


def _parse_length_normalization(text: str) -> str | float:
    if text in ("sum", "mean"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'sum', 'mean' or a number in [0, 1], got {text!r}"
        ) from None


# how a flag's text becomes a field value, by the field's annotation
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "str | None": str,
    "str | float": _parse_length_normalization,
}


def build_parser() -> argparse.ArgumentParser:
    """``lenalign train``'s parser: ``--config`` and one flag per TrainConfig field.

    Only the flags given on the command line appear in the parsed namespace, so that
    they override a config file and the file overrides the defaults.
    """
    parser = argparse.ArgumentParser(
        prog="lenalign train",
        description="Preference-train a causal LM through lenalign's fused loss. "
        "Without arguments: the embedded tiny Llama on the embedded synthetic task, offline.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="JSON or YAML file of field values; flags override it")
    for option in fields(TrainConfig):
        flag = "--" + option.name.replace("_", "-")
        help_text = f"{option.metadata['help']} (default: {option.default})"
        if option.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=_FLAG_TYPES[option.type], help=help_text)
    return parser


def config_from_args(argv: Sequence[str]) -> TrainConfig:
    """The TrainConfig of ``lenalign train`` arguments: defaults, then file, then flags."""
    values = vars(build_parser().parse_args(list(argv)))
    config_file = values.pop("config", None)
    if config_file is not None:
        return TrainConfig.from_file(config_file, **values)
    return TrainConfig(**values)


def main(argv: Sequence[str]) -> int:
    """``lenalign train [flags]``: train, print a summary; 2 on bad input, with the reason."""
    try:
        config = config_from_args(argv)
        result = train(config)
    except ValueError as error:
        print(f"lenalign train: error: {error}", file=sys.stderr)
        return 2
    print(f"done: {result.step} steps in {result.seconds:.0f} s")
    if result.train_log:
        first, last = result.train_log[0], result.train_log[-1]
        print(
            f"train  loss {first['loss']:.3f} -> {last['loss']:.3f}  "
            f"accuracy {first['accuracy']:.2f} -> {last['accuracy']:.2f}  (steps "
            f"{first['step']} and {last['step']})"
        )
    if result.eval_log:
        print(f"eval   {_format_metrics(result.eval_log[-1])}")
    print(f"metrics     {Path(config.output_dir) / METRICS_FILE}")
    print(f"checkpoint  {result.checkpoint}")
    return 0
