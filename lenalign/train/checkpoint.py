"""What a run keeps in its output_dir: checkpoints to resume from, and metrics.jsonl.

A checkpoint is ``checkpoint-<step>``: a model and tokenizer directory that
``from_pretrained`` loads, plus the optimizer, schedule and RNG state, the config that
made it, and ``checkpoint_manifest.json``, written last, which lists every other file
with its size.

Checkpoints survive crashes. ``save_checkpoint`` writes into
``.checkpoint-<step>.partial-<pid>``, a name ``find_checkpoint`` never takes, syncs it to
disk and only then renames it into place, so a crash at any moment leaves no
``checkpoint-<step>`` half written; the next save removes what the crash left. The
manifest tells a complete directory from an incomplete one that was not written this way
(an older lenalign's in-place write, a copy cut short, a full disk):
``find_checkpoint("latest")`` passes over those with a warning, and an explicit path to
one is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from ..checks import check_int, fail
from .config import TrainConfig

METRICS_FILE = "metrics.jsonl"
TRAINER_STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
MANIFEST_FILE = "checkpoint_manifest.json"
MODEL_CONFIG_FILE = "config.json"
CHECKPOINT_PREFIX = "checkpoint-"
# save_pretrained writes one of these, by format and sharding
WEIGHTS_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)

_CHECKPOINT = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
# save_checkpoint's own directories: one being written, and one that a replace set aside
_PARTIAL, _REPLACED = "partial", "replaced"
_HIDDEN = re.compile(rf"\.{CHECKPOINT_PREFIX}(\d+)\.({_PARTIAL}|{_REPLACED})-(\d+)")

# the temporary directories that save_checkpoint calls of this process are writing now;
# a save never removes these as leftovers
_writing: set[Path] = set()


def checkpoint_problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being a complete checkpoint, in words; None if it is one.

    A directory with a manifest is complete when it has the model config, weights and
    trainer state, and every file the manifest lists has the size listed. One without a
    manifest (lenalign wrote none before its checkpoints were crash-safe) is complete when
    it has those files and ``train_config.json``, which that version wrote last, reads as
    JSON.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory" if path.exists() else "no such directory"
    required = {
        MODEL_CONFIG_FILE: (MODEL_CONFIG_FILE,),
        f"model weights ({SAFE_WEIGHTS_NAME})": WEIGHTS_FILES,
        TRAINER_STATE_FILE: (TRAINER_STATE_FILE,),
        CONFIG_FILE: (CONFIG_FILE,),
    }
    missing = [
        what for what, names in required.items() if not any((path / n).is_file() for n in names)
    ]
    if missing:
        return "no " + ", no ".join(missing)
    if not (path / MANIFEST_FILE).is_file():
        try:
            json.loads((path / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return f"no {MANIFEST_FILE} and a truncated {CONFIG_FILE}"
        return None
    try:
        sizes = json.loads((path / MANIFEST_FILE).read_text())["files"]
        listed = [(str(name), int(size)) for name, size in sizes.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"an unreadable {MANIFEST_FILE}"
    wrong = []
    for name, size in listed:
        file = path / name
        if not file.is_file():
            wrong.append(f"no {name}")
        elif file.stat().st_size != size:
            wrong.append(f"{name} of {file.stat().st_size} bytes, not the {size} written")
    return ", ".join(wrong) or None


def find_checkpoint(resume: str, output_dir: str | Path) -> Path:
    """The complete checkpoint directory that ``resume`` names.

    ``"latest"``: the complete checkpoint of the highest step in ``output_dir``. Each
    incomplete ``checkpoint-<step>`` of a higher step, and each temporary directory of a
    write that a crash cut short, is passed over with a RuntimeWarning naming it and what
    it lacks. If a crash came between the two renames that replace an existing
    ``checkpoint-<step>`` (see ``save_checkpoint``), the one being replaced, set aside as
    ``.checkpoint-<step>.replaced-<pid>``, stands in for the missing name. Any other value
    is the path of a checkpoint, which must be complete.

    Nothing on disk changes, so every process of a run may call it.

    Raises:
        ValueError: naming ``resume``, for an incomplete checkpoint (saying what it
            lacks) or an output_dir without a complete one.
    """
    if resume != "latest":
        problem = checkpoint_problem(resume)
        if problem is not None:
            fail("resume", "a complete checkpoint directory", f"{resume} ({problem})")
        return Path(resume)
    directory = Path(output_dir)
    named = {
        int(match[1]): path
        for path in directory.glob(f"{CHECKPOINT_PREFIX}*")
        if (match := _CHECKPOINT.fullmatch(path.name))
    }
    # at one step: checkpoint-<step> first, a set-aside stand-in for it, then partial writes
    candidates = [(step, 0, path) for step, path in named.items()]
    for step, kind, _, path in _hidden(directory):
        if kind == _REPLACED and step not in named:
            candidates.append((step, 1, path))
        elif kind == _PARTIAL:
            candidates.append((step, 2, path))
    passed = 0
    for step, order, path in sorted(candidates, key=lambda c: (-c[0], c[1], c[2].name)):
        problem = checkpoint_problem(path)
        if order == 2:
            problem = f"an unfinished write, {problem or 'complete but not renamed into place'}"
        if problem is None:
            if order == 1:
                warnings.warn(
                    f"resume: {directory / f'{CHECKPOINT_PREFIX}{step}'} is missing (a crash "
                    f"interrupted its replacement); taking {path}, the one it replaced",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return path
        passed += 1
        warnings.warn(f"resume: passing over {path}: {problem}", RuntimeWarning, stacklevel=2)
    found = f"none ({passed} incomplete passed over)" if passed else "none"
    fail("resume", f"a complete {CHECKPOINT_PREFIX}<step> directory in {directory}", found)


def current_rng_state() -> dict[str, Any]:
    """This process's torch RNG states: one entry of ``save_checkpoint``'s ``rng_states``."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def save_checkpoint(
    directory: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    config: TrainConfig,
    *,
    rng_states: Sequence[dict[str, Any]] | None = None,
    model_state_dict: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/checkpoint-<step>`` whole, or leave ``directory`` as it was.

    The checkpoint is a model and tokenizer directory that ``from_pretrained`` loads, plus
    the optimizer, schedule and RNG states to resume from. Everything is written into
    ``.checkpoint-<step>.partial-<pid>``, synced to disk with the manifest last, and
    renamed into place; an existing ``checkpoint-<step>`` is replaced so that a complete
    one of this step is always found (``_install`` tells how). Directories that crashed
    writes left in ``directory`` are removed first, except any that a live process may
    still be writing: one of this process's, or one named after another running process.

    One process writes a checkpoint. In a multi-process run rank 0 alone calls this with
    the states gathered to it: ``model_state_dict``, the full weights, for
    ``save_pretrained``; ``optimizer_state`` instead of ``optimizer.state_dict()``; and
    ``rng_states``, every rank's ``current_rng_state()`` in rank order (default: this
    process's alone), of which ``load_checkpoint(..., rank=r)`` restores entry r.
    """
    if rng_states is None:
        rng_states = [current_rng_state()]
    elif not rng_states or not all(isinstance(s, dict) for s in rng_states):
        fail("rng_states", "a non-empty list of current_rng_state() dicts", repr(rng_states))
    directory = Path(directory)
    final = directory / f"{CHECKPOINT_PREFIX}{step}"
    partial = directory / f".{final.name}.{_PARTIAL}-{os.getpid()}"
    _remove_leftovers(directory)
    _writing.add(partial)
    try:
        model.save_pretrained(partial, state_dict=model_state_dict)
        tokenizer.save_pretrained(partial)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng_states": list(rng_states),
        }
        torch.save(state, partial / TRAINER_STATE_FILE)
        (partial / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
        # the manifest is written only once every file it lists is on disk: its presence
        # means the rest is whole, in a directory that reached its name any other way too
        sizes = _sync_tree(partial)
        manifest = {"step": step, "files": sizes}
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync(partial / MANIFEST_FILE)
        _fsync(partial)
        _install(partial, final)
    finally:
        _writing.discard(partial)
        # an exception cut the write short: its files are of no use, and may fill a disk
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    rank: int = 0,
    load_states: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None,
) -> int:
    """Restore a checkpoint's weights into ``model`` and its states; return its step.

    The RNG state restored is the one ``save_checkpoint`` stored for ``rank``.
    ``load_states(model_state_dict, optimizer_state)``, when given, receives the full
    weights and the stored optimizer state instead of ``model.load_state_dict`` and
    ``optimizer.load_state_dict``: a model sharded with FSDP2 loads them with
    torch.distributed.checkpoint's ``set_model_state_dict`` and
    ``set_optimizer_state_dict``.

    Raises:
        ValueError: naming ``path`` for an incomplete checkpoint, or ``rank`` for a rank
            the checkpoint holds no RNG state of.
    """
    check_int("rank", rank, minimum=0)
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        fail("path", "a complete checkpoint directory", f"{path} ({problem})")
    state = torch.load(path / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
    # checkpoints from before rng_states hold one process's state under two keys
    rng_states = state.get("rng_states") or [{"cpu": state["rng"], "cuda": state["cuda_rng"]}]
    if rank >= len(rng_states):
        fail("rank", f"a rank below {len(rng_states)}, the ranks {path} holds", rank)
    # an FSDP2 model's class is a subclass that fully_shard made; from_pretrained on it
    # still builds the model's own class, unsharded
    saved = type(model).from_pretrained(path, local_files_only=True)
    if load_states is None:
        model.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(state["optimizer"])
    else:
        load_states(saved.state_dict(), state["optimizer"])
    del saved
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng_states[rank]["cpu"])
    if rng_states[rank]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng_states[rank]["cuda"])
    return int(state["step"])


def kept_history(metrics_path: Path, step: int) -> list[dict[str, Any]]:
    """The metrics.jsonl lines of a resumed run up to its checkpoint's ``step``.

    Lines past it came from the part of the run that the resume replays.
    """
    if not metrics_path.is_file():
        return []
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    return [line for line in lines if line["step"] <= step]


def _install(partial: Path, final: Path) -> None:
    """Rename the finished ``partial`` to ``final``, replacing a ``final`` already there.

    A directory can be renamed only onto an absent (or empty) one, and an atomic exchange
    of two names is not portable, so a replace takes two renames: the old ``final`` is set
    aside as ``.checkpoint-<step>.replaced-<pid>``, ``partial`` takes its name, and the
    old one is deleted. A crash before the first rename or after the second leaves a
    complete ``final``; one between them leaves the old one complete under its aside name,
    which ``find_checkpoint`` takes in place of the missing ``final`` and the next save
    renames back. So at every moment a complete checkpoint of this step is found, the old
    or the new.
    """
    directory = final.parent
    if final.exists() or final.is_symlink():
        aside = directory / f".{final.name}.{_REPLACED}-{os.getpid()}"
        os.replace(final, aside)
        _fsync(directory)
        os.replace(partial, final)
        _fsync(directory)
        _remove(aside)
    else:
        os.replace(partial, final)
        _fsync(directory)


def _remove_leftovers(directory: Path) -> None:
    """Clear what crashed saves left in ``directory``, except what may still be written.

    A partial write is deleted; a checkpoint set aside by an interrupted replace takes its
    name back if nothing holds it now, else is deleted. Left alone: this process's writes
    under way, and directories named after another running process (pids are reused, so
    a leftover may wait for a later save, which is harmless: no reader takes it).
    """
    for step, kind, pid, path in _hidden(directory):
        if path in _writing or (pid != os.getpid() and _running(pid)):
            continue
        final = directory / f"{CHECKPOINT_PREFIX}{step}"
        if kind == _REPLACED and not (final.exists() or final.is_symlink()):
            os.replace(path, final)
            _fsync(directory)
        else:
            _remove(path)


def _hidden(directory: Path) -> list[tuple[int, str, int, Path]]:
    """save_checkpoint's temporary directories in ``directory``: (step, kind, pid, path)."""
    found = []
    for path in directory.glob(f".{CHECKPOINT_PREFIX}*"):
        if (match := _HIDDEN.fullmatch(path.name)) and path.is_dir():
            found.append((int(match[1]), match[2], int(match[3]), path))
    return sorted(found)


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine; True where that cannot be told."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def _sync_tree(root: Path) -> dict[str, int]:
    """fsync every file and directory under ``root``; each file's size by relative path."""
    sizes = {}
    for path in sorted(root.rglob("*")):
        _fsync(path)
        if path.is_file():
            sizes[path.relative_to(root).as_posix()] = path.stat().st_size
    return sizes


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    if os.name != "posix":
        if path.is_dir():
            return  # a directory cannot be opened on Windows; NTFS journals its entries
        flags = os.O_RDWR  # Windows flushes only a handle open for writing
    else:
        flags = os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
