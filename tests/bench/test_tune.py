"""benchmarks/tune.py, the launch-parameter sweep, at a tiny size.

On CPU the kernels run through the interpreter, so the times mean nothing; what is
checked is that every launch is verified before it is timed, that a launch with a wrong
result is reported as failed and never timed, and that the heuristic's launch is marked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark_script

from lenalign import kernels

ARGS = ["--rows", "3", "--vocab", "300", "--blocks", "128", "--warps", "1"]


@pytest.fixture(scope="module")
def tune():
    return load_benchmark_script("tune")


def run(tune, out: Path, dtype: str = "bfloat16") -> tuple[int, list[dict]]:
    status = tune.main([*ARGS, "--dtype", dtype, "--out", str(out)])
    report = json.loads((out / "tune.json").read_text())
    assert (out / "tune.md").read_text().startswith("| kernel |")
    return status, report["results"]


# float32 logits are never rounded: the check must allow the kernels' exp differences alone
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_launch_is_checked_then_timed(tune, tmp_path: Path, dtype: str) -> None:
    status, rows = run(tune, tmp_path, dtype)
    assert status == 0
    # the heuristic's (512, 2) and the one pair given, for each kernel
    launches = {(r["kernel"], r["block"], r["warps"]) for r in rows}
    assert launches == {(k, b, w) for k in ("forward", "backward") for b, w in ((512, 2), (128, 1))}
    for row in rows:
        assert row["failure"] is None
        assert row["seconds"] > 0 and row["bytes_per_s"] > 0
        assert row["heuristic"] == ((row["block"], row["warps"]) == (512, 2))


def test_a_wrong_forward_fails_and_is_not_timed(tune, tmp_path: Path, monkeypatch) -> None:
    real = kernels.row_logprob_forward

    def off_by_a_little(*args, **kwargs):
        logprob, row_max, log_sum = real(*args, **kwargs)
        return logprob + 1e-3, row_max, log_sum

    monkeypatch.setattr(tune.kernels, "row_logprob_forward", off_by_a_little)
    status, rows = run(tune, tmp_path)
    assert status == 1
    for row in rows:
        if row["kernel"] == "forward":
            assert "log-probabilities off" in row["failure"] and "seconds" not in row
        else:
            assert row["failure"] is None


def test_a_wrong_backward_fails_and_is_not_timed(tune, tmp_path: Path, monkeypatch) -> None:
    real = kernels.row_logprob_backward

    def scaled(*args, **kwargs):
        grad = real(*args, **kwargs)
        return grad.mul_(1.05)

    monkeypatch.setattr(tune.kernels, "row_logprob_backward", scaled)
    status, rows = run(tune, tmp_path)
    assert status == 1
    for row in rows:
        if row["kernel"] == "backward":
            assert "ulp" in row["failure"] and "seconds" not in row


def test_candidates_keep_blocks_that_fit(tune) -> None:
    pairs = tune.candidates(32000, torch.bfloat16.itemsize, [2048, 65536], [4, 128])
    # the heuristic's first; a block wider than the padded row (32768) and warps that
    # leave a thread without an element are dropped
    assert pairs == [(8192, 16), (2048, 4)]
