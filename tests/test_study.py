"""The length study: its task generator and scorer, its settings, and one ``--quick`` run.

The run (about 40 s on two busy CPU cores) happens once per module, through the console
command, and the tests below read its outputs. Runs are seeded and the tiny model trains
on one CPU thread, so a run repeats itself exactly on one machine; the directions
asserted here held for seeds 0 to 3, not only for the seed the test uses.
"""

from __future__ import annotations

import csv
import json
import math
import random
import subprocess
import sys

import pytest

from lenalign.study import (
    COLUMNS,
    QUICK,
    StudyConfig,
    config_from_args,
    length_exponent,
    main,
    normalization_label,
    scaled_beta,
)
from lenalign.study_plot import main as plot_main
from lenalign.study_task import (
    FILLER,
    FILLER_SHARE,
    MAX_DIGITS,
    MIN_DIGITS,
    corrupt,
    make_sort_pairs,
    sort_answer,
    sort_prompt,
    sort_score,
    strip_filler,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ----------------------------------------------------------------------------- the task


def test_prompt_and_answer():
    assert sort_prompt("4913") == "sort: 4913\n"
    assert sort_answer("sort: 4913\n") == "1349"
    assert sort_answer(sort_prompt("5050")) == "0055"


@pytest.mark.parametrize("digits", ["", "12a", "1 2", "١٢"])
def test_prompt_refuses_non_digits(digits):
    with pytest.raises(ValueError, match=r"^digits:"):
        sort_prompt(digits)


@pytest.mark.parametrize("prompt", ["sort: 4913", "sort 4913\n", "sort: \n", "sort: 49x\n", ""])
def test_answer_refuses_other_prompts(prompt):
    with pytest.raises(ValueError, match=r"^prompt:"):
        sort_answer(prompt)


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("1349", 1.0),
        ("1394", 0.5),  # two positions wrong
        ("134", 0.75),  # a missing digit costs its position
        ("1349..", 4 / 6),  # extra characters, filler included, cost too
        ("", 0.0),
        ("9431", 0.0),
    ],
)
def test_score_counts_positions_over_the_longer_string(completion, score):
    assert sort_score("sort: 4913\n", completion) == pytest.approx(score)


def test_strip_filler_keeps_the_answer_part():
    assert strip_filler("1349....") == "1349"
    assert strip_filler("1349") == "1349"
    assert strip_filler("....") == ""


def test_corrupt_gives_a_wrong_answer_of_the_same_length():
    rng = random.Random(0)
    for answer in ["0123", "555", "0000009", "12"]:
        for _ in range(50):
            wrong = corrupt(answer, rng)
            assert len(wrong) == len(answer) and wrong != answer
            assert set(wrong) <= set("0123456789")


def test_pairs_are_seeded_and_prefix_stable():
    first = make_sort_pairs(200, 7, length_bias=4.0)
    assert first == make_sort_pairs(200, 7, length_bias=4.0)
    assert first[:50] == make_sort_pairs(50, 7, length_bias=4.0)
    assert first != make_sort_pairs(200, 8, length_bias=4.0)


def test_pairs_prefer_the_answer_with_filler_over_a_wrong_answer():
    for pair in make_sort_pairs(500, 1, length_bias=3.0):
        answer = sort_answer(pair.prompt)
        assert MIN_DIGITS <= len(answer) <= MAX_DIGITS
        assert strip_filler(pair.chosen) == answer
        assert sort_score(pair.prompt, strip_filler(pair.chosen)) == 1.0
        assert len(pair.rejected) == len(answer) and pair.rejected != answer


@pytest.mark.parametrize("bias", [0.5, 2.0, 4.0, 7.3])
def test_measured_length_bias_is_the_requested_one(bias):
    pairs = make_sort_pairs(4000, 3, length_bias=bias)
    measured = sum(len(p.chosen) - len(p.rejected) for p in pairs) / len(pairs)
    # the standard error of the mean is below 0.1 for these biases and 4000 pairs
    assert measured == pytest.approx(bias, abs=0.25)


def test_most_chosen_completions_carry_filler():
    pairs = make_sort_pairs(4000, 3, length_bias=4.0)
    filled = [p for p in pairs if p.chosen.endswith(FILLER)]
    assert len(filled) / len(pairs) == pytest.approx(FILLER_SHARE, abs=0.03)
    # 4 / 0.75 = 5.33 filler characters per filled completion: 5 or 6 of them
    assert {len(p.chosen) - len(strip_filler(p.chosen)) for p in filled} == {5, 6}


def test_length_bias_changes_the_filler_only():
    plain = make_sort_pairs(300, 5, length_bias=0.0)
    biased = make_sort_pairs(300, 5, length_bias=6.0)
    assert all(len(p.chosen) == len(p.rejected) for p in plain)
    for a, b in zip(plain, biased, strict=True):
        assert (a.prompt, a.rejected) == (b.prompt, b.rejected)
        assert strip_filler(b.chosen) == a.chosen


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n": -1, "length_bias": 1.0}, "n"),
        ({"n": 2.0, "length_bias": 1.0}, "n"),
        ({"n": 5, "length_bias": -0.5}, "length_bias"),
        ({"n": 5, "length_bias": math.nan}, "length_bias"),
        ({"n": 5, "length_bias": math.inf}, "length_bias"),
        ({"n": 5, "length_bias": True}, "length_bias"),
        ({"n": 5, "length_bias": "4"}, "length_bias"),
    ],
)
def test_pair_generator_refuses_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        make_sort_pairs(seed=0, **kwargs)


# ----------------------------------------------------------------------------- settings


def test_betas_follow_each_normalization_scale():
    assert scaled_beta(0.1, "sum", 7.5) == pytest.approx(0.1)
    assert scaled_beta(0.1, "mean", 7.5) == pytest.approx(0.75)
    assert scaled_beta(0.1, 0.5, 9.0) == pytest.approx(0.3)
    assert [length_exponent(v) for v in ("sum", 0.25, "mean")] == [0.0, 0.25, 1.0]
    assert [normalization_label(v) for v in ("sum", 0.25, "mean")] == ["sum", "lambda=0.25", "mean"]


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"length_bias": -1.0}, "length_bias"),
        ({"length_bias": math.nan}, "length_bias"),
        ({"loss_type": "hinge"}, "loss_type"),
        ({"normalizations": ()}, "normalizations"),
        ({"normalizations": ("sum", 1.5)}, "normalizations"),
        ({"normalizations": ("median",)}, "normalizations"),
        ({"normalizations": ("sum", 0.0)}, "normalizations"),
        ({"betas": ()}, "betas"),
        ({"betas": (0.1, 0.0)}, "betas"),
        ({"betas": (0.1, 0.1)}, "betas"),
        ({"steps": 0}, "steps"),
        ({"sft_steps": True}, "sft_steps"),
        ({"eval_size": 2.5}, "eval_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"sft_learning_rate": math.inf}, "sft_learning_rate"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_config_refuses_bad_values(overrides, argument):
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        StudyConfig(**overrides)


def test_flags_override_quick_which_overrides_defaults():
    config = config_from_args(["--quick", "--steps", "5", "--normalizations", "sum,0.5"])
    assert config.steps == 5
    assert config.normalizations == ("sum", 0.5)
    assert config.betas == QUICK["betas"]
    assert config.train_size == QUICK["train_size"]
    assert config_from_args(["--betas", "0.2,1"]).betas == (0.2, 1.0)
    assert config_from_args([]) == StudyConfig()


def test_command_reports_bad_values(capsys):
    assert main(["--length-bias", "-2"]) == 2
    assert "lenalign study: error: length_bias:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--normalizations", "sum,median"])
    assert exit_info.value.code == 2
    assert "median" in capsys.readouterr().err


def test_plot_command_reports_a_missing_file(tmp_path, capsys):
    assert plot_main([str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert plot_main([]) == 2


# ----------------------------------------------------------------------------- a --quick run


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
    # the figure script draws it again from results.json alone
    assert plot_main([str(output_dir / "results.json"), str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes().startswith(PNG_SIGNATURE)


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
