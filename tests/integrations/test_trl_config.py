"""LenalignDPOConfig's fields: values, command-line parsing, the compositions it refuses
(each ValueError naming the field), and the import guard of the package (missing trl,
untested trl version)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trl
from transformers import HfArgumentParser
from trl import DPOConfig

from lenalign.integrations.trl import LenalignDPOConfig
from lenalign.integrations.trl.config import resolve_settings
from lenalign.integrations.trl.requirement import require_trl


def make(tmp_path, **fields) -> LenalignDPOConfig:
    return LenalignDPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, **fields)


def test_defaults_are_dpo_trainers(tmp_path):
    config = make(tmp_path)
    assert config.length_normalization == "sum"
    assert config.simpo_gamma == 0.5
    assert config.rdpo_alpha == 0.0
    assert resolve_settings(config).exponent == 0.0
    # a plain DPOConfig reads as "sum" with the defaults
    plain = resolve_settings(DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False))
    assert (plain.exponent, plain.simpo_gamma, plain.rdpo_alpha) == (0.0, 0.5, 0.0)


@pytest.mark.parametrize(("value", "exponent"), [("mean", 1.0), (0.25, 0.25), ("0.5", 0.5)])
def test_length_normalization_values(tmp_path, value, exponent):
    assert resolve_settings(make(tmp_path, length_normalization=value)).exponent == exponent


def test_command_line_parses_names_and_numbers(tmp_path):
    parser = HfArgumentParser(LenalignDPOConfig)
    for text, expected in (("mean", "mean"), ("0.5", 0.5)):
        (config,) = parser.parse_args_into_dataclasses(
            [
                *("--output_dir", str(tmp_path), "--report_to", "none", "--bf16", "false"),
                *("--length_normalization", text),
            ]
        )
        assert config.length_normalization == expected


REFUSED = {
    "unknown name": ({"length_normalization": "median"}, "length_normalization"),
    "lambda above 1": ({"length_normalization": 1.5}, "length_normalization"),
    "None": ({"length_normalization": None}, "length_normalization"),
    "a bool": ({"length_normalization": True}, "length_normalization"),
    "ipo with mean": ({"loss_type": "ipo", "length_normalization": "mean"}, "length_normalization"),
    "sigmoid_norm with lambda": (
        {"loss_type": ["sigmoid", "sigmoid_norm"], "length_normalization": 0.5},
        "length_normalization",
    ),
    "ld_alpha with mean": (
        {"ld_alpha": 0.5, "length_normalization": "mean"},
        "length_normalization",
    ),
    "rdpo_alpha without rdpo": ({"rdpo_alpha": 0.1}, "rdpo_alpha"),
    "unknown loss type": ({"loss_type": ["sigmoid", "orpo"]}, "loss_type"),
    "simpo_gamma nan": ({"loss_type": "simpo", "simpo_gamma": float("nan")}, "simpo_gamma"),
    "precompute for simpo": (
        {"loss_type": "simpo", "precompute_ref_log_probs": True},
        "precompute_ref_log_probs",
    ),
}


@pytest.mark.parametrize(("fields", "argument"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_compositions_name_the_field(tmp_path, fields, argument):
    with pytest.raises(ValueError, match=rf"^{argument}: expected"):
        make(tmp_path, **fields)


def test_ipo_and_sigmoid_norm_keep_sum(tmp_path):
    # with "sum" they are TRL's own, already averaged losses (test_trl_parity checks the values)
    config = make(tmp_path, loss_type=["ipo", "sigmoid_norm"])
    assert resolve_settings(config).exponent == 0.0


BLOCK_TRL = """
import sys
class BlockTrl:
    def find_spec(self, name, path=None, target=None):
        if name == "trl" or name.startswith("trl."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, BlockTrl())
try:
    import lenalign.integrations.trl
except ImportError as error:
    print("IMPORT-ERROR", error)
"""


def test_missing_trl_names_the_extra():
    completed = subprocess.run(
        [sys.executable, "-c", BLOCK_TRL], capture_output=True, text=True, timeout=120, check=True
    )
    assert "IMPORT-ERROR" in completed.stdout
    assert "pip install 'lenalign[trl]'" in completed.stdout


def test_untested_trl_version_warns(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.warns(UserWarning, match=r"tested with TRL 1\.16\.x, found 1\.17\.0"):
        require_trl()
    monkeypatch.setattr(trl, "__version__", "1.16.3")
    require_trl()  # no warning: pytest's filter would turn it into a failure below
