"""``lenalign study``: does averaging log-likelihoods trade generation length for score?

The study trains the embedded tiny Llama in two phases, every configuration from the
same seed:

1. **Reference.** Supervised fine-tuning on the correct answers of the sort task
   (``lenalign.study_task``), without filler: a policy that writes answers of the right
   length, as DPO assumes of its starting point.
2. **Preference training**, once per configuration, from a copy of the reference, on
   pairs whose chosen completions are longer than the rejected ones by ``length_bias``
   tokens on average: every ``length_normalization`` (sum, lambda in between, mean) at
   every base beta, through ``lenalign.train.train``.

Each policy, and the reference as the starting point, is then evaluated on held-out
prompts and pairs: mean greedy generation length, task score (with and without the
filler), the log-likelihood of the correct answers, and held-out preference accuracy.
The results go to ``results.csv``, ``results.json`` and ``length_study.png`` (length
against score, one point per configuration; ``lenalign.study_plot``). docs/length_study.md
shows and reads a run of the defaults.

Betas follow each normalization's scale. A score s(y) = sum / |y|**lambda is about
|y|**lambda times smaller than the sum, so a base beta b (the "sum" scale) becomes
b * L**lambda, L being the mean completion length of the training pairs in tokens: the
typical pair then sees the same beta * margin whatever lambda is.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from .api import sequence_logprobs
from .study_plot import DEFAULT_FIGURE, plot_study
from .study_task import FILLER, make_sort_pairs, sort_answer, sort_score, strip_filler
from .tiny import build_byte_tokenizer, build_tiny_llama
from .train import (
    PreferenceData,
    TrainConfig,
    cpu_threads,
    evaluate_preferences,
    generate_greedy,
    generation_metrics,
    micro_batch_indices,
    train,
)
from .train_data import (
    PreferencePair,
    TokenizedPair,
    collate_pairs,
    special_tokens,
    tokenize_pairs,
)

STUDY_LOSS_TYPES = ("sigmoid", "ipo")
CSV_FILE = "results.csv"
JSON_FILE = "results.json"
# the data's rows are a few dozen tokens at most: these limits never truncate anything
MAX_LENGTH = 128
MAX_PROMPT_LENGTH = 64
# greedy completions are decoded in batches this large; it changes speed, not results
GENERATION_BATCH_SIZE = 64

Normalization = str | float


@dataclass(frozen=True)
class StudyConfig:
    """Every setting of a study; each field is also a ``lenalign study`` flag.

    Invalid values raise ValueError naming the field.
    """

    length_bias: float = 4.0
    loss_type: str = "sigmoid"
    normalizations: tuple[Normalization, ...] = ("sum", 0.25, 0.5, 0.75, "mean")
    betas: tuple[float, ...] = (0.03, 0.1, 0.3)
    seed: int = 0
    train_size: int = 4096
    eval_size: int = 256
    sft_steps: int = 300
    sft_learning_rate: float = 3e-3
    steps: int = 600
    learning_rate: float = 3e-4
    batch_size: int = 16
    cpu_threads: int = 1
    output_dir: str = "runs/study"

    def __post_init__(self) -> None:
        if _real("length_bias", self.length_bias) < 0:
            raise ValueError(f"length_bias: expected a number >= 0, got {self.length_bias}")
        if self.loss_type not in STUDY_LOSS_TYPES:
            raise ValueError(
                f"loss_type: expected one of {STUDY_LOSS_TYPES}, got {self.loss_type!r}"
            )
        if not self.normalizations:
            raise ValueError("normalizations: expected at least one")
        exponents = {length_exponent(value) for value in self.normalizations}
        if len(exponents) != len(self.normalizations):
            raise ValueError(f"normalizations: repeated values in {self.normalizations}")
        if not self.betas:
            raise ValueError("betas: expected at least one")
        if any(_real("betas", beta) <= 0 for beta in self.betas):
            raise ValueError(f"betas: expected numbers > 0, got {self.betas}")
        if len(set(self.betas)) != len(self.betas):
            raise ValueError(f"betas: repeated values in {self.betas}")
        for name in ("sft_learning_rate", "learning_rate"):
            if _real(name, getattr(self, name)) <= 0:
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)}")
        positive = ("train_size", "eval_size", "sft_steps", "steps", "batch_size", "cpu_threads")
        for name in (*positive, "seed"):
            value = getattr(self, name)
            # bool is an int subclass, and True as a count is a slip, not a 1
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: expected an integer, got {value!r}")
            if name in positive and value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value}")


def _real(name: str, value: Any) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


# --quick: two normalizations at one beta, fewer pairs and steps; within 2 minutes
QUICK = {
    "normalizations": ("sum", "mean"),
    "betas": (0.1,),
    "train_size": 2048,
    "eval_size": 128,
    "sft_steps": 250,
    "steps": 300,
}


def length_exponent(normalization: Normalization) -> float:
    """lambda of a ``length_normalization`` value: 0 for "sum", 1 for "mean", else itself."""
    if normalization == "sum":
        return 0.0
    if normalization == "mean":
        return 1.0
    if isinstance(normalization, bool) or not isinstance(normalization, (int, float)):
        raise ValueError(f"normalizations: expected 'sum', 'mean' or lambda, got {normalization!r}")
    if not 0.0 <= normalization <= 1.0:
        raise ValueError(f"normalizations: expected lambda in [0, 1], got {normalization}")
    return float(normalization)


def normalization_label(normalization: Normalization) -> str:
    """How tables and the figure name a normalization: sum, mean or lambda=<value>."""
    if isinstance(normalization, str):
        return normalization
    return f"lambda={normalization:g}"


def scaled_beta(base_beta: float, normalization: Normalization, typical_length: float) -> float:
    """The beta of ``normalization`` that matches ``base_beta`` on summed scores:
    ``base_beta * typical_length**lambda``."""
    return base_beta * typical_length ** length_exponent(normalization)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class StudyData:
    """The pairs of a study and the lengths that describe them, in tokens (EOS included)."""

    train_pairs: list[PreferencePair]
    eval_pairs: list[PreferencePair]
    chosen_length: float  # mean over the training pairs
    rejected_length: float
    answer_length: float  # mean over the held-out prompts' correct answers
    max_new_tokens: int  # limit of a greedy completion

    @property
    def typical_length(self) -> float:
        """Mean length of a training completion, chosen and rejected pooled."""
        return (self.chosen_length + self.rejected_length) / 2


def completion_tokens(text: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of a completion as the trainer counts them: its tokens and the EOS."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1


def build_data(config: StudyConfig, tokenizer: PreTrainedTokenizerBase) -> StudyData:
    """``train_size + eval_size`` pairs from ``seed``, the last ``eval_size`` held out."""
    pairs = make_sort_pairs(
        config.train_size + config.eval_size, config.seed, length_bias=config.length_bias
    )
    train_pairs, eval_pairs = pairs[: config.train_size], pairs[config.train_size :]
    chosen = [completion_tokens(p.chosen, tokenizer) for p in train_pairs]
    rejected = [completion_tokens(p.rejected, tokenizer) for p in train_pairs]
    answers = [completion_tokens(sort_answer(p.prompt), tokenizer) for p in eval_pairs]
    return StudyData(
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        chosen_length=float(np.mean(chosen)),
        rejected_length=float(np.mean(rejected)),
        answer_length=float(np.mean(answers)),
        # room for twice the longest chosen completion, so that a policy that learned to
        # write more filler than the data holds is measured, not cut at the data's length
        max_new_tokens=2 * max(chosen),
    )


# ----------------------------------------------------------------------------- the phases


def demonstration_rows(
    prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> list[TokenizedPair]:
    """Each prompt followed by its correct answer and the EOS, tokenized as the trainer
    tokenizes a chosen completion (a pair whose two completions are the answer; its
    rejected half goes unused)."""
    answers = [sort_answer(prompt) for prompt in prompts]
    pairs = [PreferencePair(p, a, a) for p, a in zip(prompts, answers, strict=True)]
    return tokenize_pairs(pairs, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)


def demonstration_batch(rows: Sequence[TokenizedPair], pad: int) -> dict[str, torch.Tensor]:
    """``rows`` as one right-padded batch: ``input_ids``, ``attention_mask`` and
    ``completion_mask``, [len(rows), T] each."""
    # collate_pairs lays the chosen rows out first: they are the batch's first half
    batch = collate_pairs(rows, pad)
    return {name: tensor[: len(rows)] for name, tensor in batch.items()}


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


@dataclass(frozen=True)
class HeldOut:
    """What every model is evaluated on: the held-out pairs, tokenized, and their prompts'
    correct answers."""

    pairs: PreferenceData
    plain_pairs: PreferenceData  # those without filler: only correctness tells them apart
    answers: list[TokenizedPair]  # demonstration_rows of the held-out prompts

    @classmethod
    def of(cls, data: StudyData, tokenizer: PreTrainedTokenizerBase) -> HeldOut:
        """The held-out sets of a study's data."""
        pairs = data.eval_pairs
        rows = tokenize_pairs(pairs, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
        plain = [i for i, pair in enumerate(pairs) if not pair.chosen.endswith(FILLER)]
        return cls(
            pairs=PreferenceData(list(pairs), rows),
            plain_pairs=PreferenceData([pairs[i] for i in plain], [rows[i] for i in plain]),
            answers=demonstration_rows([pair.prompt for pair in pairs], tokenizer),
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


# ----------------------------------------------------------------------------- the study


# the columns of results.csv, in order; a run and the reference share them
COLUMNS = (
    "name",
    "normalization",
    "exponent",
    "base_beta",
    "beta",
    "loss_type",
    "gen_length",
    "gen_finished",
    "filler_rate",
    "task_score",
    "answer_score",
    "answer_logprob",
    "accuracy",
    "accuracy_plain",
    "margin",
    "seconds",
)


@dataclass
class StudyResult:
    """What a study measured: the reference's row, one row per run, and the set-up."""

    config: StudyConfig
    data: StudyData
    reference: dict[str, Any]
    runs: list[dict[str, Any]]
    seconds: float

    def to_json(self, command: str) -> dict[str, Any]:
        """The content of results.json; ``command`` is the command line that ran it."""
        settings = asdict(self.config)
        return {
            "command": command,
            "settings": settings,
            "data": {
                "train_pairs": len(self.data.train_pairs),
                "eval_pairs": len(self.data.eval_pairs),
                "chosen_length": self.data.chosen_length,
                "rejected_length": self.data.rejected_length,
                "measured_length_bias": self.data.chosen_length - self.data.rejected_length,
                "typical_length": self.data.typical_length,
                "answer_length": self.data.answer_length,
                "max_new_tokens": self.data.max_new_tokens,
            },
            "reference": self.reference,
            "runs": self.runs,
            "seconds": self.seconds,
        }


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
    with cpu_threads(config.cpu_threads), _quiet_checkpoints():
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


# ----------------------------------------------------------------------------- outputs


def write_csv(result: StudyResult, path: Path) -> None:
    """One line per model, the reference first; empty cells where a column does not apply."""
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        for row in [result.reference, *result.runs]:
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


# the columns of the printed and documented table: header, results key, number format
TABLE = (
    ("beta", "beta", "{:.3g}"),
    ("gen length", "gen_length", "{:.2f}"),
    ("finished", "gen_finished", "{:.2f}"),
    ("filler", "filler_rate", "{:.2f}"),
    ("task score", "task_score", "{:.3f}"),
    ("answer score", "answer_score", "{:.3f}"),
    ("answer log-prob", "answer_logprob", "{:.2f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("accuracy (plain)", "accuracy_plain", "{:.3f}"),
)


def format_table(result: StudyResult) -> str:
    """The results as a Markdown table, as docs/length_study.md shows them."""
    lines = [
        "| configuration | " + " | ".join(header for header, _, _ in TABLE) + " |",
        "|---|" + "---:|" * len(TABLE),
    ]
    for row in [result.reference, *result.runs]:
        cells = [row["normalization"] or row["name"]]
        cells += [_cell(row[key], spec) for _, key, spec in TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else spec.format(value)


def write_outputs(result: StudyResult, output_dir: Path, command: str) -> dict[str, Path]:
    """Write results.csv, results.json and, when matplotlib is installed, the figure.

    Returns the paths written, by kind ("csv", "json", "figure").
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": output_dir / CSV_FILE, "json": output_dir / JSON_FILE}
    write_csv(result, paths["csv"])
    results = result.to_json(command)
    paths["json"].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    figure = output_dir / DEFAULT_FIGURE
    if plot_study(results, figure) is None:
        paths["figure"] = figure
    return paths


# ----------------------------------------------------------------------------- command line


def _parse_normalizations(text: str) -> tuple[Normalization, ...]:
    values: list[Normalization] = []
    for item in text.split(","):
        item = item.strip()
        if item in ("sum", "mean"):
            values.append(item)
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected 'sum', 'mean' or numbers in [0, 1], comma-separated, got {item!r}"
            ) from None
    return tuple(values)


def _parse_betas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


_HELP = {
    "length_bias": "mean extra tokens (filler) of chosen over rejected completions",
    "loss_type": f"one of {', '.join(STUDY_LOSS_TYPES)}",
    "normalizations": "comma-separated length_normalization values: sum, mean, lambda in [0, 1]",
    "betas": "comma-separated betas on the sum scale; lambda uses beta * L**lambda",
    "seed": "seed of the model, the data and the data order, the same for every run",
    "train_size": "training pairs (the SFT phase uses their prompts)",
    "eval_size": "held-out pairs and prompts evaluated",
    "sft_steps": "supervised steps that make the reference",
    "sft_learning_rate": "peak learning rate of the supervised phase",
    "steps": "preference-training steps per configuration",
    "learning_rate": "peak learning rate of preference training",
    "batch_size": "pairs per preference step (SFT steps take twice as many answers)",
    "cpu_threads": "torch CPU threads (1 suits the tiny model, see docs/trainer.md)",
    "output_dir": "where results.csv, results.json and length_study.png go",
}
_PARSERS: dict[str, Callable[[str], Any]] = {
    "length_bias": float,
    "loss_type": str,
    "normalizations": _parse_normalizations,
    "betas": _parse_betas,
    "sft_learning_rate": float,
    "learning_rate": float,
    "output_dir": str,
}


def build_parser() -> argparse.ArgumentParser:
    """``lenalign study``'s parser: ``--quick`` and one flag per StudyConfig field.

    Only the flags given appear in the parsed namespace, so that they override ``--quick``.
    """
    parser = argparse.ArgumentParser(
        prog="lenalign study",
        description="Train the embedded tiny Llama on a sort task whose chosen completions "
        "are longer, once per length normalization and beta; plot generation length "
        "against task score. Defaults: about 6 minutes on 2 CPU cores.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="sum and mean at one beta, fewer pairs and steps (under 2 minutes); "
        "flags given override its values",
    )
    for option in fields(StudyConfig):
        default = option.default
        if isinstance(default, tuple):
            default = ",".join(str(v) for v in default)
        parser.add_argument(
            "--" + option.name.replace("_", "-"),
            type=_PARSERS.get(option.name, int),
            help=f"{_HELP[option.name]} (default: {default})",
        )
    return parser


def config_from_args(argv: Sequence[str]) -> StudyConfig:
    """The StudyConfig of ``lenalign study`` arguments: defaults, then --quick, then flags."""
    values = vars(build_parser().parse_args(list(argv)))
    quick = values.pop("quick", False)
    return StudyConfig(**({**QUICK, **values} if quick else values))


def main(argv: Sequence[str]) -> int:
    """``lenalign study [flags]``: run, write the results, print the table; 2 on bad input."""
    try:
        config = config_from_args(argv)
    except ValueError as error:
        print(f"lenalign study: error: {error}", file=sys.stderr)
        return 2
    result = run_study(config, log=lambda line: print(line, flush=True))
    command = " ".join(["lenalign", "study", *argv])
    paths = write_outputs(result, Path(config.output_dir), command)
    print()
    print(format_table(result))
    print()
    for kind in ("csv", "json", "figure"):
        if kind in paths:
            print(f"{kind:<7}{paths[kind]}")
    if "figure" not in paths:
        print("figure not drawn: matplotlib is not installed (pip install matplotlib)")
    print(f"done in {result.seconds:.0f} s")
    return 0
