"""The length study's settings, and how its commands report bad input."""

from __future__ import annotations

import math

import pytest

from lenalign.study import (
    QUICK,
    StudyConfig,
    length_exponent,
    normalization_label,
    scaled_beta,
)
from lenalign.study.cli import config_from_args, main
from lenalign.study.plot import main as plot_main


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
