"""TrainConfig: every field a documented flag, config files, and the checks of values."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from lenalign.train import TrainConfig
from lenalign.train.cli import build_parser, config_from_args

REPO = Path(__file__).resolve().parents[2]


def test_every_field_has_a_flag_and_documentation():
    usage = build_parser().format_help()
    docs = (REPO / "docs/trainer.md").read_text()
    for option in fields(TrainConfig):
        assert "--" + option.name.replace("_", "-") in usage
        assert f"`{option.name}`" in docs, f"docs/trainer.md does not document {option.name}"


def test_flags_override_config_file(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; a float field takes it as the number
    (tmp_path / "c.yaml").write_text(
        "max_steps: 7\nlength_normalization: 0.5\nbeta: 2\nlearning_rate: 1e-4\n"
    )
    config = config_from_args(["--config", str(tmp_path / "c.yaml"), "--max-steps", "9"])
    assert (config.max_steps, config.length_normalization, config.beta) == (9, 0.5, 2.0)
    assert config.learning_rate == 1e-4
    (tmp_path / "c.json").write_text('{"length_normalization": "mean", "precompute_ref": true}')
    config = config_from_args(["--config", str(tmp_path / "c.json"), "--no-precompute-ref"])
    assert (config.length_normalization, config.precompute_ref) == ("mean", False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_steps": 0}, "max_steps: expected an integer >= 1"),
        ({"max_steps": 2.5}, "max_steps: expected an integer"),
        ({"batch_size": True}, "batch_size: expected an integer"),
        ({"length_normalization": "median"}, "length_normalization"),
        ({"length_normalization": 1.5}, "length_normalization"),
        ({"loss_type": "kto"}, "loss_type"),
        ({"beta": 0}, "beta"),
        ({"gamma": 0.5}, "gamma"),
        ({"loss_type": "simpo", "precompute_ref": True}, "precompute_ref"),
        ({"max_prompt_length": 512}, "max_prompt_length"),
        ({"precision": "fp8"}, "precision"),
        ({"tokenizer": "somewhere"}, "tokenizer: only with model"),
    ],
)
def test_bad_config_values_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_bad_flag_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--length-normalization", "median"])
    assert "expected 'sum', 'mean' or a number in [0, 1], got 'median'" in capsys.readouterr().err


def test_config_file_with_unknown_field(tmp_path):
    (tmp_path / "c.json").write_text('{"max_steps": 3, "epochs": 2}')
    with pytest.raises(ValueError, match="unknown fields epochs"):
        TrainConfig.from_file(tmp_path / "c.json")
