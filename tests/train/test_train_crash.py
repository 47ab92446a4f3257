"""A run killed (SIGKILL) while writing a checkpoint resumes with ``resume="latest"`` and
ends with the weights and loss curve of a run that was never stopped.

Each killed run is a process (forked by crash_run.py, in a subprocess) that kills itself at
one moment of the write of checkpoint-4; the resumed run is an ordinary ``train`` call.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_bounded
from train_helpers import small_config

from lenalign.train import train
from lenalign.train.checkpoint import checkpoint_problem

RUN = {"max_steps": 6, "save_steps": 2, "eval_size": 0, "synthetic_size": 64}
KILLED_AT = 4  # the step whose checkpoint is being written when the kill comes
MOMENTS = ("trainer_state", "rename", "replace")
SCRIPT = Path(__file__).with_name("crash_run.py")
# crash_run.py imports once (~10 s) and then forks the killed runs, about a second each
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return train(small_config(tmp_path_factory.mktemp("straight"), **RUN))


@pytest.fixture(scope="module")
def killed(tmp_path_factory, straight) -> dict[str, Path]:
    """For each moment, the directory of a run killed at it: root/run is its output_dir."""
    roots, command = {}, [sys.executable, str(SCRIPT), str(KILLED_AT)]
    for moment in MOMENTS:
        root = roots[moment] = tmp_path_factory.mktemp(moment)
        config = small_config(root, **RUN)
        if moment == "replace":
            # a run that wrote checkpoint-2 and checkpoint-4, resumed from checkpoint-2:
            # its step-4 save replaces checkpoint-4
            out, source = Path(config.output_dir), straight.checkpoint.parent
            for name in ("checkpoint-2", "checkpoint-4"):
                shutil.copytree(source / name, out / name)
            shutil.copy(source / "metrics.jsonl", out)
            config = replace(config, resume=str(out / "checkpoint-2"))
        (root / "config.json").write_text(json.dumps(asdict(config)))
        command += [moment, str(root / "config.json")]
    # run_bounded kills the forked runs too on a timeout: they share its session
    finished = run_bounded(command, TIMEOUT_S)
    assert finished.returncode == 0, finished.stdout
    return roots


def _hidden(out: Path) -> dict[str, Path]:
    """The kill's leftovers in ``out`` by kind: 'partial' or 'replaced'."""
    return {p.name.split(".")[2].split("-")[0]: p for p in out.glob(".checkpoint-*")}


def _curve(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "tokens_per_second"} for line in lines]


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_killed_run_resumes_as_if_never_stopped(killed, straight, moment):
    root = killed[moment]
    out = root / "run"
    # the kill came where intended, and left no incomplete checkpoint-<step>
    left = _hidden(out)
    partial = left["partial"]
    assert partial.name.startswith(f".checkpoint-{KILLED_AT}.partial-")
    for path in out.glob("checkpoint-*"):
        assert checkpoint_problem(path) is None, path
    if moment == "trainer_state":
        assert checkpoint_problem(partial) == "no train_config.json"
        assert (partial / "model.safetensors").is_file()
    else:
        assert checkpoint_problem(partial) is None
    if moment == "replace":
        assert sorted(left) == ["partial", "replaced"]
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
        expected = rf"checkpoint-{KILLED_AT} is missing .* taking {left['replaced']}"
    else:
        assert sorted(left) == ["partial"]
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
        expected = rf"passing over {partial}: an unfinished write"

    with pytest.warns(RuntimeWarning, match=expected):
        resumed = train(small_config(root, **RUN, resume="latest"))

    assert resumed.step == straight.step == RUN["max_steps"]
    for name, parameter in straight.model.state_dict().items():
        assert torch.equal(parameter, resumed.model.state_dict()[name]), name
    assert _curve(out) == _curve(straight.checkpoint.parent)
    assert [r["step"] for r in _curve(out)] == list(range(1, RUN["max_steps"] + 1))
    # the resumed run's first save cleared the leftovers (and put a set-aside one back)
    assert not _hidden(out)
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for name in names:
        assert checkpoint_problem(out / name) is None, name
