"""benchmarks/linear_head.py --dry: every contender is checked against the truth, then
timed or reported skipped with its reason; a wrong contender is a failure, never a time.

On CPU the times mean nothing; what is checked is the plumbing the one GPU run relies on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark_script

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def linear_head():
    return load_benchmark_script("linear_head")


def read_report(out: Path) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"linear_head.json is not strict JSON: {constant}")

    return json.loads((out / "linear_head.json").read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def dry_run(linear_head, tmp_path_factory) -> tuple[int, dict, str]:
    out = tmp_path_factory.mktemp("linear_head")
    status = linear_head.main(["--dry", "--out", str(out)])
    return status, read_report(out), (out / "linear_head.md").read_text()


def rows_of(report: dict, case: int = 0) -> dict[str, dict]:
    return {row["contender"]: row for row in report["cases"][case]["results"]}


def test_dry_run_reports_every_contender_measured_or_skipped(linear_head, dry_run) -> None:
    status, report, table = dry_run
    assert status == 0 and report["complete"] and report["dry"]
    assert (report["dtype"], report["truth_dtype"]) == ("float32", "float64")
    assert [c["case"] for c in report["cases"]] == ["4x16x32x1000 all", "4x16x32x1000 half"]
    assert table.startswith("Machine: ")
    for case in range(2):
        rows = rows_of(report, case)
        assert list(rows) == list(linear_head.CONTENDERS)
        for name, contender in linear_head.CONTENDERS.items():
            row = rows[name]
            reason = contender.unavailable(CPU)
            if reason is not None:
                assert (row["status"], row["reason"]) == ("skipped", reason)
            elif row["status"] == "skipped":
                # only a GPU kernel may refuse CPU, and then with the interpreter's error
                assert contender.gpu_kernel
                assert row["reason"].startswith("on CPU, in Triton's interpreter: ")
            else:
                assert row["status"] == "measured", row
                assert len(row["times_s"]) == report["repeats"] and row["median_s"] > 0
                assert row["peak_bytes"] is None or row["peak_bytes"] >= 0
                assert set(row["errors"]) == set(linear_head.FIGURES)
                for figure, error in row["errors"].items():
                    assert math.isfinite(error) and error <= row["bounds"][figure]
            assert f"| {name} |" in table
    for name in ("eager", "compile", "lenalign"):
        assert rows_of(report)[name]["status"] == "measured"
    if linear_head.head_contenders.trl_unavailable(CPU) is None:
        assert rows_of(report)["trl-fused-head"]["status"] == "measured"


def shifted_tokens(real):
    # every token's log-prob moved one position on: the sums, and so the gradients, stay
    # right while each token is wrong, which only the token check can see
    def run(*args):
        tokens, seq_sum, seq_mean = real(*args)
        return tokens.roll(1, dims=1), seq_sum, seq_mean

    return run


def miscounted_mean(real):
    # the mean over one token too many: right log-probs, wrong gradients and none of the
    # sums, as a contender that counted a prompt token would get
    def run(hidden, weight, labels, mask):
        tokens, seq_sum, _ = real(hidden, weight, labels, mask)
        return tokens, seq_sum, seq_sum / (mask[:, 1:].sum(1) + 1)

    return run


@pytest.mark.parametrize(
    ("wrong", "figure"), [(shifted_tokens, "token_logprobs"), (miscounted_mean, "grad_hidden")]
)
def test_a_wrong_contender_is_a_failure_not_a_time(
    linear_head, tmp_path: Path, monkeypatch, capsys, wrong, figure
) -> None:
    real = linear_head.CONTENDERS["lenalign"]
    broken = linear_head.HeadContender("lenalign", "deliberately wrong", wrong(real.run))
    monkeypatch.setitem(linear_head.CONTENDERS, "lenalign", broken)
    assert linear_head.main(["--dry", "--contender", "lenalign", "--out", str(tmp_path)]) == 1
    for case in read_report(tmp_path)["cases"]:
        rows = rows_of({"cases": [case]})
        assert list(rows) == ["eager", "lenalign"]
        assert rows["eager"]["status"] == "measured"
        failed = rows["lenalign"]
        assert failed["status"] == "failed" and "median_s" not in failed
        assert failed["errors"][figure] > failed["bounds"][figure]
        assert f"{figure} " in failed["reason"]
    assert "| lenalign | FAILED: max abs error over the bound" in capsys.readouterr().out
    assert "| lenalign | FAILED" in (tmp_path / "linear_head.md").read_text()


def test_an_error_is_a_failure_except_a_gpu_kernel_on_cpu(
    linear_head, tmp_path: Path, monkeypatch
) -> None:
    def refuse(*args):
        raise RuntimeError("no driver for these tensors")

    for name, gpu_kernel in (("lenalign", False), ("cce", True)):
        raising = linear_head.HeadContender(name, "raises", refuse, gpu_kernel=gpu_kernel)
        monkeypatch.setitem(linear_head.CONTENDERS, name, raising)
    argv = ["--dry", "--contender", "lenalign", "--contender", "cce", "--out", str(tmp_path)]
    assert linear_head.main(argv) == 1
    rows = rows_of(read_report(tmp_path))
    assert rows["lenalign"] == {
        "contender": "lenalign",
        "summary": "raises",
        "status": "failed",
        "reason": "RuntimeError: no driver for these tensors",
    }
    assert rows["cce"]["status"] == "skipped"
    assert rows["cce"]["reason"].endswith("RuntimeError: no driver for these tensors")


def test_bad_arguments_are_refused(linear_head) -> None:
    for argv in (["--shape", "2x12x8"], ["--repeats", "0"], ["--contender", "nobody"]):
        with pytest.raises(SystemExit):
            linear_head.main(argv)
