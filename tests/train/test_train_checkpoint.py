"""Checkpoints: what one holds, and a resume that continues the very same run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_helpers import byte_ids, small_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from lenalign.train import train


def test_checkpoint_round_trip(tmp_path):
    result = train(small_config(tmp_path, max_steps=2))
    checkpoint = result.checkpoint
    assert checkpoint == tmp_path / "run/checkpoint-2"

    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    ids = tokenizer("upper: abc\n", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [*byte_ids("upper: abc\n"), tokenizer.eos_token_id]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, result.model(ids).logits, rtol=0, atol=0)
    saved = json.loads((checkpoint / "train_config.json").read_text())
    assert saved["max_steps"] == 2
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert state["optimizer"]["state"]


def test_resume_continues_the_same_run(tmp_path):
    straight = train(small_config(tmp_path / "straight", save_steps=3))
    resumed_dir = tmp_path / "resumed/run"
    resumed_dir.mkdir(parents=True)
    # the state of a run that stopped after its step-3 checkpoint
    shutil.copytree(tmp_path / "straight/run/checkpoint-3", resumed_dir / "checkpoint-3")
    metrics = (tmp_path / "straight/run/metrics.jsonl").read_text().splitlines()
    (resumed_dir / "metrics.jsonl").write_text("\n".join(metrics) + "\n")

    resumed = train(small_config(tmp_path / "resumed", save_steps=3, resume="latest"))

    assert resumed.step == straight.step == 6
    for name, parameter in straight.model.state_dict().items():
        assert torch.equal(parameter, resumed.model.state_dict()[name]), name

    def comparable(log):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in log]

    assert [r["step"] for r in resumed.train_log] == [1, 2, 3, 4, 5, 6]
    assert comparable(resumed.train_log) == comparable(straight.train_log)
    assert resumed.eval_log == straight.eval_log


def test_resume_rejects_a_directory_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"resume: .* is not a checkpoint"):
        train(small_config(tmp_path, resume=str(tmp_path)))
