"""benchmarks/gpu.sh --dry: the GPU box's one call, run through on a CPU, so that its
plumbing (the budget, the collection after every step, the skipped steps, every output
file present and parseable) is tested on every commit, never first on the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
STEPS = ("kernel tests", "lenalign bench", "linear head", "tune")


def run_script(
    out: Path, *arguments: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *arguments, str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


def unpacked(out: Path, into: Path) -> Path:
    with tarfile.open(out / "results.tar.gz") as archive:
        archive.extractall(into, filter="data")
    return into


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    root = tmp_path_factory.mktemp("gpu-dry")
    result = run_script(root / "out", "--dry")
    return result, unpacked(root / "out", root / "files")


def test_the_dry_run_passes_every_step(dry_run):
    result, files = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    progress = (files / "progress.txt").read_text()
    assert progress.startswith("[") and "plan: kernel tests" in progress
    for step in STEPS:
        assert f"{step}: exit status 0 after" in progress, progress
    assert "done: exit status 0" in progress


def test_every_output_file_is_present_and_parseable(dry_run):
    _, files = dry_run
    assert "torch" in (files / "machine.txt").read_text()
    tests = (files / "tests.log").read_text()
    assert " passed" in tests and "needs a CUDA device" in tests  # the GPU test skipped, said why
    bench = json.loads((files / "bench.json").read_text())
    assert [case["label"] for case in bench["cases"]] == ["2x16x64 float32"]
    rows = bench["cases"][0]["results"]
    skipped = {row["contender"] for row in rows if row["status"] == "skipped"}
    assert "lenalign-triton" in skipped  # GPU-only, recorded as such
    assert (files / "bench.md").read_text().startswith("Machine: ")
    head = json.loads((files / "linear_head.json").read_text())
    assert head["cases"], head
    assert (files / "linear_head.md").read_text()
    tune = json.loads((files / "tune.json").read_text())
    assert tune and (files / "tune.md").read_text().startswith("| kernel |")
    for log in ("bench.log", "linear_head.log", "tune.log"):
        assert (files / log).read_text()


def test_a_spent_budget_skips_the_steps_and_still_returns_the_files(tmp_path):
    result = run_script(tmp_path / "out", "--dry", "--budget", "1", timeout=120)
    assert result.returncode == 0, result.stderr
    progress = (tmp_path / "out" / "progress.txt").read_text()
    for step in STEPS:
        assert f"{step}: skipped: " in progress and "budget left" in progress
    files = unpacked(tmp_path / "out", tmp_path / "files")
    assert (files / "machine.txt").exists() and (files / "progress.txt").exists()


def test_a_step_is_stopped_at_the_end_of_the_budget(tmp_path):
    # the kernel tests estimated at 1 s and the later steps at 5 s each, in a 3 s budget:
    # the tests start, get 1 s (the rest is the later steps' share, though they cannot
    # fit), and torch's import alone outlasts it
    result = run_script(
        tmp_path / "out", "--dry", "--budget", "3", env={"LENALIGN_GPU_ESTIMATES": "1 5 5 5"}
    )
    assert result.returncode == 124, result.stderr
    progress = (tmp_path / "out" / "progress.txt").read_text()
    assert "kernel tests: stopped at its share of the budget" in progress
    for step in STEPS[1:]:
        assert f"{step}: skipped: " in progress
    assert (tmp_path / "out" / "results.tar.gz").exists()


def test_bad_arguments_are_refused(tmp_path):
    for arguments in (("--budget",), ("--budget", "soon"), ("--wet",)):
        result = run_script(tmp_path / "out", *arguments, timeout=30)
        assert result.returncode == 2 and "usage:" in result.stderr
    result = run_script(tmp_path / "out", "--dry", env={"LENALIGN_GPU_ESTIMATES": "1 2"})
    assert result.returncode == 2 and "LENALIGN_GPU_ESTIMATES" in result.stderr
