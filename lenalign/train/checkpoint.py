"""What a run keeps in its output_dir: checkpoints to resume from, and metrics.jsonl.

A checkpoint is ``checkpoint-<step>``: a model and tokenizer directory that
``from_pretrained`` loads, plus the optimizer, schedule and RNG state, and the config
that made it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import TrainConfig

METRICS_FILE = "metrics.jsonl"
TRAINER_STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
CHECKPOINT_PREFIX = "checkpoint-"


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


def load_checkpoint(
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


def kept_history(metrics_path: Path, step: int) -> list[dict[str, Any]]:
    """The metrics.jsonl lines of a resumed run up to its checkpoint's ``step``.

    Lines past it came from the part of the run that the resume replays.
    """
    if not metrics_path.is_file():
        return []
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    return [line for line in lines if line["step"] <= step]
