"""benchmarks/linear_head.py at a tiny size: checked first, then measured."""

from __future__ import annotations

import pytest
from helpers import load_benchmark_script

ARGS = ["--shape", "2x12x8x50", "--repeats", "1"]


@pytest.fixture(scope="module")
def linear_head():
    return load_benchmark_script("linear_head")


def test_prints_time_and_memory_for_each_contender(linear_head, capsys) -> None:
    assert linear_head.main(ARGS) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "2x12x8x50" in line]
    rows = {line.split("|")[2].strip(): line for line in lines}
    assert set(rows) == {"eager", "lenalign", "trl-fused-head"}
    assert "| 1.00x |" in rows["eager"]
    for name in ("eager", "lenalign"):
        assert " ms |" in rows[name] and " MiB |" in rows[name]
    trl_reason = linear_head.trl_unavailable()
    if trl_reason is None:
        assert " ms |" in rows["trl-fused-head"]
    else:
        assert f"skipped: {trl_reason}" in rows["trl-fused-head"]


def test_a_wrong_result_is_a_failure_not_a_time(linear_head, capsys, monkeypatch) -> None:
    real = linear_head.lenalign_step
    wrong = (lambda *a: real(*a) * 1.01, lambda: None)
    monkeypatch.setitem(linear_head.CONTENDERS, "lenalign", wrong)
    assert linear_head.main(ARGS) == 1
    lines = capsys.readouterr().out.splitlines()
    (failed,) = [line for line in lines if "| lenalign |" in line]
    assert "FAILED: relative errors" in failed and " ms |" not in failed


def test_bad_shape_is_refused(linear_head) -> None:
    with pytest.raises(SystemExit):
        linear_head.main(["--shape", "2x12x8"])
