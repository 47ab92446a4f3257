"""``lenalign bench`` end to end on a tiny case: table, files, failures and skips.

The command runs as users run it, in a subprocess, with one contender added through the
``--extra-contender`` hook that is fast and wrong: it forgets the causal shift. Such a
contender must come out as a failure with the reason, never with a time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lenalign.bench.cli import main
from lenalign.bench.load import background_load

WRONG_CONTENDER = """
from lenalign import sequence_logprobs
from lenalign.bench import Contender


def _unshifted(workload):
    def run(logits):
        out = sequence_logprobs(logits, workload.labels, workload.mask, backend="torch")
        return out.sum, out.mean

    return run


UNSHIFTED = Contender("unshifted", "scores each label with its own position", _unshifted)
"""

CONTENDERS = "eager,lenalign-torch,lenalign-torch-inplace,lenalign-triton,liger,trl"
MODES = ("forward", "forward+backward")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    root = tmp_path_factory.mktemp("bench")
    (root / "wrong_contender.py").write_text(WRONG_CONTENDER)
    out = root / "out"
    path = [str(root), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    command = [
        sys.executable, "-m", "lenalign.cli", "bench",
        "--device", "cpu",
        "--shape", "2x16x64",
        "--contenders", CONTENDERS,
        "--extra-contender", "wrong_contender:UNSHIFTED",
        "--repeats", "2",
        "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return result, out


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    report = json.loads((out / "bench.json").read_text())
    (case,) = report["cases"]
    return {(row["contender"], row["mode"]): row for row in case["results"]}


def test_prints_the_table_and_writes_the_files(bench_run):
    result, out = bench_run
    assert "2x16x64 float32" in result.stdout, result.stderr
    table_lines = result.stdout.splitlines()
    for contender in ("eager", "lenalign-torch", "lenalign-torch-inplace"):
        assert any(line.split()[1:2] == [contender] for line in table_lines), result.stdout
    report = json.loads((out / "bench.json").read_text())
    assert report["device"] == "cpu" and report["cases"][0]["error"] is None
    assert "| mode | contender |" in (out / "bench.md").read_text()
    # the third-party contenders' versions are part of the machine line
    packages = report["cases"][0]["machine"]["packages"]
    assert set(packages) == {"liger-kernel", "trl"}
    for dist, version in packages.items():
        assert f"{dist} {version or 'not installed'}" in result.stdout
    if importlib.util.find_spec("matplotlib") is None:
        assert "chart not written: matplotlib is not installed" in result.stdout
    else:
        assert (out / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_right_contenders_are_checked_then_measured(bench_run):
    _, out = bench_run
    rows = _rows(out)
    for mode in MODES:
        for contender in ("eager", "lenalign-torch"):
            row = rows[contender, mode]
            assert row["status"] == "ok", row
            assert all(ratio <= 1.0 for ratio in row["check"].values())
            assert len(row["times_s"]) == 2 and row["median_s"] > 0
            assert row["peak_bytes"] >= 0
        assert rows["eager", mode]["time_vs_eager"] == pytest.approx(1.0)
    assert "grad" in rows["lenalign-torch", "forward+backward"]["check"]
    assert ("lenalign-torch-inplace", "forward") not in rows


def test_a_wrong_contender_is_a_failure_not_a_time(bench_run):
    result, out = bench_run
    assert result.returncode == 1, result.stderr
    rows = _rows(out)
    for mode in MODES:
        row = rows["unshifted", mode]
        assert row["status"] == "failed"
        assert row["reason"].startswith("wrong result: sum is off")
        assert "median_s" not in row and "times_s" not in row and "peak_bytes" not in row
    failed_lines = [line for line in result.stdout.splitlines() if "unshifted" in line]
    assert len(failed_lines) == 2
    assert all("FAILED: wrong result" in line and " ms" not in line for line in failed_lines)


def test_contenders_that_cannot_run_are_skipped_with_the_reason(bench_run):
    result, out = bench_run
    rows = _rows(out)
    expected = {"lenalign-triton": "need a GPU"}
    for module, contender in (("liger_kernel", "liger"), ("trl", "trl")):
        if importlib.util.find_spec(module) is None:
            expected[contender] = "is not installed"
    for contender, reason in expected.items():
        for mode in MODES:
            row = rows[contender, mode]
            assert row["status"] == "skipped" and reason in row["reason"], row
        assert f"skipped {contender} (forward, forward+backward): " in result.stdout


@pytest.mark.parametrize(
    "arguments",
    [["--shape", "4x512"], ["--shape", "4x1x8"], ["--contenders", "eager,nope"], ["--modes", ""]],
)
def test_bad_arguments_are_refused(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert "lenalign bench: error:" in capsys.readouterr().err


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_background_load_keeps_cores_busy_and_leaves_nothing_behind():
    with background_load(2) as spinners:
        time.sleep(1.0)
        assert all(spinner.poll() is None for spinner in spinners)
        # each spins: far above an idle process's few milliseconds, even on a busy machine
        assert all(_cpu_seconds(spinner.pid) > 0.05 for spinner in spinners)
    assert all(spinner.poll() is not None for spinner in spinners)


def test_a_spinner_stops_once_the_benchmark_that_started_it_is_killed(tmp_path):
    parent = (
        "import sys, time\n"
        "from lenalign.bench.load import background_load\n"
        "with background_load(1) as spinners:\n"
        "    print(spinners[0].pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    spinner = int(process.stdout.readline())
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{spinner}").exists():
        state = Path(f"/proc/{spinner}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":  # exited, not yet reaped by its new parent
            break
        time.sleep(0.1)
    else:
        assert not Path(f"/proc/{spinner}").exists(), "the spinner outlived its parent"


def test_the_run_records_its_background_load(tmp_path):
    command = [
        sys.executable, "-m", "lenalign.cli", "bench", "--device", "cpu", "--shape", "2x8x16",
        "--contenders", "eager", "--modes", "forward", "--repeats", "1",
        "--background-load", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["background_load"] == 1
    assert "background load: 1 spinning process(es)" in (tmp_path / "bench.md").read_text()
    assert main(["--background-load", "-1"]) == 2
