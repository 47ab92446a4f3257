"""benchmarks/linear_head.py at a tiny size: checked first, then measured."""

from __future__ import annotations

import pytest
from helpers import load_benchmark_script

ARGS = ["--shape", "2x12x8x50", "--repeats", "1"]


@pytest.fixture(scope="module")
def linear_head():
    return load_benchmark_script("linear_head")


def test_prints_time_and_memory_for_both(linear_head, capsys) -> None:
    assert linear_head.main(ARGS) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "2x12x8x50" in line]
    assert [line.split("|")[2].strip() for line in lines] == ["eager", "lenalign"]
    for line in lines:
        assert " ms |" in line and " MiB |" in line
    assert "| 1.00x |" in lines[0]


def test_a_wrong_result_is_a_failure_not_a_time(linear_head, capsys, monkeypatch) -> None:
    real = linear_head.lenalign_step
    monkeypatch.setattr(linear_head, "lenalign_step", lambda *a: real(*a) * 1.01)
    assert linear_head.main(ARGS) == 1
    out = capsys.readouterr().out
    assert "FAILED: relative errors" in out and " ms |" not in out


def test_bad_shape_is_refused(linear_head) -> None:
    with pytest.raises(SystemExit):
        linear_head.main(["--shape", "2x12x8"])
