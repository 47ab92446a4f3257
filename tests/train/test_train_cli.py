"""``lenalign train``: end to end through the console command, and its error reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lenalign.cli import main as cli_main
from lenalign.train.cli import main


def test_cli_with_defaults_runs_end_to_end(tmp_path, capsys):
    output_dir = tmp_path / "run"
    code = cli_main(["train", "--max-steps", "3", "--output-dir", str(output_dir)])
    assert code == 0
    out = capsys.readouterr().out
    assert "embedded tiny Llama" in out
    assert "done: 3 steps" in out
    assert "eval   loss" in out
    assert (output_dir / "checkpoint-3/config.json").is_file()
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["split"] for line in lines] == ["train", "eval"]


def test_cli_reports_a_bad_row(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p"}\n')
    code = main(["--train-file", str(data), "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert f"{data}: row 2: missing field 'chosen'" in capsys.readouterr().err


def test_console_command_runs_offline(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"max_steps: 2\neval_size: 8\ngenerate_size: 2\noutput_dir: {tmp_path}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "lenalign.cli", "train", "--config", str(config), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "done: 2 steps" in completed.stdout
