"""The length study end to end: one ``--quick`` run and what it writes and shows.

The run (about 40 s on two busy CPU cores) happens once per module, through the console
command, and the tests below read its outputs. Runs are seeded and the tiny model trains
on one CPU thread, so a run repeats itself exactly on one machine; the directions
asserted here held for seeds 0 to 3, not only for the seed the test uses.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from lenalign.study import COLUMNS, QUICK

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``lenalign study --quick`` through the console entry point, run once."""
    output_dir = tmp_path_factory.mktemp("study")
    command = [sys.executable, "-m", "lenalign.cli", "study", "--quick"]
    command += ["--output-dir", str(output_dir)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return completed, output_dir


def test_quick_command_succeeds_and_prints_the_table(quick_run):
    completed, output_dir = quick_run
    assert completed.returncode == 0, completed.stderr
    assert "| configuration | beta | gen length |" in completed.stdout
    assert f"csv    {output_dir / 'results.csv'}" in completed.stdout
    assert "done in" in completed.stdout


def test_quick_outputs_csv_and_json(quick_run):
    _, output_dir = quick_run
    with (output_dir / "results.csv").open() as lines:
        rows = list(csv.DictReader(lines))
    assert tuple(rows[0]) == COLUMNS
    assert [row["name"] for row in rows] == ["reference", "sum beta=0.1", rows[2]["name"]]
    assert rows[2]["normalization"] == "mean"
    assert rows[0]["accuracy"] == ""  # the reference has no implicit reward

    results = json.loads((output_dir / "results.json").read_text())
    assert results["command"].startswith("lenalign study --quick --output-dir ")
    assert results["settings"]["normalizations"] == ["sum", "mean"]
    assert results["settings"]["steps"] == QUICK["steps"]
    data = results["data"]
    assert data["measured_length_bias"] == pytest.approx(4.0, abs=0.3)
    assert data["eval_pairs"] == QUICK["eval_size"]
    sum_run, mean_run = results["runs"]
    assert mean_run["beta"] == pytest.approx(0.1 * data["typical_length"])
    for row in [results["reference"], *results["runs"]]:
        assert 1 <= row["gen_length"] <= data["max_new_tokens"]
        for name in ("task_score", "answer_score", "filler_rate", "gen_finished"):
            assert 0 <= row[name] <= 1
        assert row["task_score"] <= row["answer_score"] + 1e-9
    assert float(rows[1]["gen_length"]) == pytest.approx(sum_run["gen_length"], rel=1e-5)


def test_quick_figure_is_a_png(quick_run, tmp_path):
    _, output_dir = quick_run
    figure = (output_dir / "length_study.png").read_bytes()
    assert figure.startswith(PNG_SIGNATURE)
    assert len(figure) > 20_000  # axes, points, labels: not an empty canvas
    width, height = int.from_bytes(figure[16:20], "big"), int.from_bytes(figure[20:24], "big")
    assert (width, height) == (1140, 720)  # 9.5 x 6 inches at 120 dpi
    # the figure script draws it again from results.json alone, run as docs/length_study.md says
    again = tmp_path / "again.png"
    command = [sys.executable, "-m", "lenalign.study.plot", str(output_dir / "results.json")]
    completed = subprocess.run([*command, str(again)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    # nothing imports the script before runpy runs it, which would make runpy warn
    assert "RuntimeWarning" not in completed.stderr
    assert completed.stdout.strip() == str(again)
    assert again.read_bytes().startswith(PNG_SIGNATURE)


def test_quick_directions(quick_run):
    """What preference training did to the reference, in directions that held for seeds
    0 to 3 of --quick (not a comparison of sum with mean, which a seed can flip)."""
    _, output_dir = quick_run
    results = json.loads((output_dir / "results.json").read_text())
    reference = results["reference"]
    assert reference["filler_rate"] == 0.0  # the reference never saw filler
    assert reference["task_score"] > 0.8
    for run in results["runs"]:
        assert run["accuracy"] > 0.9, run["name"]
        assert run["gen_length"] > reference["gen_length"], run["name"]
        assert run["task_score"] < reference["task_score"], run["name"]
