"""Preference data for the trainer: JSONL records, validation, tokenization, batching.

The batch layout is TRL's concatenated one, so that a batch of B pairs costs a single
forward pass: 2B rows, the B chosen rows first and then the B rejected rows in the same
order, right-padded to the longest row. Each row is the prompt's tokens followed by one
completion's tokens; ``completion_mask`` is true on completion tokens only, so the prompt
and the padding are never scored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One preference judgement: for ``prompt``, ``chosen`` is preferred over ``rejected``."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class TokenizedPair:
    """A pair as two token rows that share their first ``prompt_length`` tokens (the prompt)."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_length: int


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids the layout needs from a tokenizer."""

    bos: int | None  # prepended to every prompt when the tokenizer has one
    eos: int  # appended to every completion
    pad: int  # fills the right of short rows; never attended to or scored


def pair_from_record(record: Any, row: int, source: str = "data") -> PreferencePair:
    """Validate one parsed JSONL record; ``row`` (1-based) and ``source`` name it in errors.

    Keys other than prompt, chosen and rejected are ignored. The prompt may be empty;
    a completion may not, since it would leave nothing but the EOS to compare.
    """
    where = f"{source}: row {row}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in PAIR_FIELDS:
        if field not in record:
            raise ValueError(f"{where}: missing field {field!r}")
        if not isinstance(record[field], str):
            raise ValueError(
                f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}"
            )
    for field in ("chosen", "rejected"):
        if record[field] == "":
            raise ValueError(f"{where}: field {field!r} is an empty completion")
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"])


def load_preference_jsonl(path: str | Path) -> list[PreferencePair]:
    """Read a JSONL file of ``{"prompt", "chosen", "rejected"}`` objects, one per line.

    Rows are numbered by line from 1 (blank lines are skipped but keep their number), so
    an error message points at the line to fix.

    Raises:
        ValueError: naming the file, the row and the field, for a line that is not JSON,
            a missing or non-string field, or an empty completion; or for a file
            without any pair.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    pairs = []
    with path.open(encoding="utf-8") as lines:
        for row, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: row {row}: not valid JSON ({error.msg})") from None
            pairs.append(pair_from_record(record, row, source=str(path)))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file")
    return pairs


def write_preference_jsonl(pairs: Sequence[PreferencePair], path: str | Path) -> None:
    """Write pairs in the layout ``load_preference_jsonl`` reads."""
    with Path(path).open("w", encoding="utf-8") as out:
        for pair in pairs:
            record = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def special_tokens(tokenizer: Any) -> SpecialTokens:
    """BOS, EOS and padding ids of a Hugging Face tokenizer.

    Tokenizers without a padding token (Llama's among them) pad with EOS: padding is
    neither attended to nor scored, so its id does not matter.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer: has no eos_token_id; completions must end with an EOS")
    pad = tokenizer.pad_token_id
    return SpecialTokens(bos=tokenizer.bos_token_id, eos=eos, pad=eos if pad is None else pad)


def encode_prompt(text: str, tokenizer: Any, max_prompt_length: int) -> list[int]:
    """BOS (if any) and the prompt's tokens, cut from the left to ``max_prompt_length``.

    The BOS survives the cut: models are trained to see it first, and the end of the
    prompt is the part that the completion answers.
    """
    bos = special_tokens(tokenizer).bos
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = [] if bos is None else [bos]
    keep = max(max_prompt_length - len(prefix), 0)
    return prefix + body[len(body) - min(keep, len(body)) :]


def tokenize_pair(
    pair: PreferencePair, tokenizer: Any, max_length: int, max_prompt_length: int
) -> TokenizedPair:
    """Tokenize a pair into its two rows, truncating to ``max_length`` tokens per row.

    Prompt and completions are tokenized separately (no special tokens), a BOS is put
    before the prompt when the tokenizer has one and an EOS after each completion. A pair
    that does not fit loses the start of its prompt first, never below
    ``max_prompt_length`` tokens, then the end of its completions. Both rows keep the
    same prompt tokens, so the pair still compares two answers to one question.
    """
    tokens = special_tokens(tokenizer)
    chosen = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"] + [tokens.eos]
    rejected = tokenizer(pair.rejected, add_special_tokens=False)["input_ids"] + [tokens.eos]
    longest = max(len(chosen), len(rejected))
    prompt_budget = max(max_length - longest, max_prompt_length)
    prompt = encode_prompt(pair.prompt, tokenizer, min(prompt_budget, max_length - 1))
    room = max_length - len(prompt)
    return TokenizedPair(
        chosen_ids=prompt + chosen[:room],
        rejected_ids=prompt + rejected[:room],
        prompt_length=len(prompt),
    )


def tokenize_pairs(
    pairs: Sequence[PreferencePair], tokenizer: Any, max_length: int, max_prompt_length: int
) -> list[TokenizedPair]:
    """``tokenize_pair`` over a data set."""
    return [tokenize_pair(p, tokenizer, max_length, max_prompt_length) for p in pairs]


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch B pairs as 2B right-padded rows: chosen rows 0..B-1, rejected rows B..2B-1.

    Returns ``input_ids`` and ``attention_mask`` [2B, T] int64, for the model, and
    ``completion_mask`` [2B, T] bool, true on the completion tokens (EOS included): pass
    it with the ``input_ids`` as labels to ``sequence_logprobs(..., shift=True)``.
    """
    if not pairs:
        raise ValueError("pairs: expected at least one pair")
    rows = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    starts = [p.prompt_length for p in pairs] * 2
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, start : len(row)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }
