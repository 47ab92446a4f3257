"""Helpers of the trainer's tests: a config of a few seconds and the byte tokenizer's ids.

Everything runs the embedded tiny Llama on CPU, with few steps; runs are seeded, and CPU
float arithmetic is deterministic, so the assertions on learning are stable.
"""

from __future__ import annotations

from pathlib import Path

from lenalign.train import TrainConfig


def small_config(tmp_path: Path, **overrides) -> TrainConfig:
    """A run of a few seconds: few pairs, small batches, a short greedy generation."""
    values = {
        "output_dir": str(tmp_path / "run"),
        "synthetic_size": 512,
        "eval_size": 64,
        "batch_size": 8,
        "max_steps": 6,
        "warmup_steps": 2,
        "logging_steps": 1,
        "eval_steps": 0,
        "generate_size": 4,
        "max_new_tokens": 6,
        "progress": False,
    }
    return TrainConfig(**{**values, **overrides})


def byte_ids(text: str) -> list[int]:
    """The byte tokenizer's ids, written out independently of it: byte b is id b + 3."""
    return [b + 3 for b in text.encode("utf-8")]
