"""Checkpoints: what one holds, and a resume that continues the very same run."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from train_helpers import byte_ids, small_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from lenalign.train import train
from lenalign.train.checkpoint import (
    checkpoint_problem,
    current_rng_state,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


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
    expected = r"resume: expected a complete checkpoint directory, got .* \(no config.json"
    with pytest.raises(ValueError, match=expected):
        train(small_config(tmp_path, resume=str(tmp_path)))


# ---- crash safety: incomplete directories, leftovers, replacing, several ranks' RNG ----


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished run with complete checkpoint-1 and checkpoint-2."""
    config = small_config(
        tmp_path_factory.mktemp("saved"), max_steps=2, save_steps=1, eval_size=0, synthetic_size=64
    )
    return train(config), config


def _incomplete(kind: str, source: Path, target: Path) -> str:
    """Make ``target`` an incomplete checkpoint of ``kind`` from the complete ``source``;
    return what find_checkpoint should say it lacks."""
    if kind == "only_config":
        target.mkdir()
        shutil.copy(source / "config.json", target)
        return "no model weights (model.safetensors), no trainer_state.pt, no train_config.json"
    shutil.copytree(source, target)
    if kind == "weights_only":  # what the in-place writer left when killed after the weights
        for name in ("trainer_state.pt", "train_config.json", "checkpoint_manifest.json"):
            (target / name).unlink()
        return "no trainer_state.pt, no train_config.json"
    if kind == "legacy_truncated":  # the in-place writer killed in its last file
        (target / "checkpoint_manifest.json").unlink()
        text = (target / "train_config.json").read_text()
        (target / "train_config.json").write_text(text[: len(text) // 2])
        return "no checkpoint_manifest.json and a truncated train_config.json"
    assert kind == "short_file"  # a file cut short after the manifest was written
    data = (target / "trainer_state.pt").read_bytes()
    (target / "trainer_state.pt").write_bytes(data[:100])
    return f"trainer_state.pt of 100 bytes, not the {len(data)} written"


KINDS = ("weights_only", "only_config", "legacy_truncated", "short_file")


def _copy_checkpoints(saved, out: Path, *steps: int) -> None:
    source = Path(saved[1].output_dir)
    for step in steps:
        shutil.copytree(source / f"checkpoint-{step}", out / f"checkpoint-{step}")


def test_latest_passes_over_incomplete_directories(tmp_path, saved):
    out = tmp_path / "run"
    _copy_checkpoints(saved, out, 1, 2)
    complete = out / "checkpoint-2"
    expected = {}
    for step, kind in enumerate(KINDS, start=3):
        expected[f"checkpoint-{step}"] = _incomplete(kind, complete, out / f"checkpoint-{step}")
    # a write that a crash stopped just before its rename, and an incomplete older one
    shutil.copytree(complete, out / ".checkpoint-7.partial-123")
    expected[".checkpoint-7.partial-123"] = "an unfinished write, complete but not renamed"
    _incomplete("only_config", complete, out / "checkpoint-0")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_checkpoint("latest", out) == complete
    assert {w.category for w in caught} == {RuntimeWarning}
    messages = [str(w.message) for w in caught]
    # newest first, each named with what it lacks; checkpoint-0 is not passed over
    assert [m.split(": ")[1] for m in messages] == [
        f"passing over {out / name}" for name in reversed(expected)
    ]
    for message, lacks in zip(messages, reversed(expected.values()), strict=True):
        assert lacks in message


@pytest.mark.parametrize("kind", KINDS)
def test_an_explicit_incomplete_checkpoint_is_refused(tmp_path, saved, kind):
    target = tmp_path / "checkpoint-3"
    lacks = _incomplete(kind, Path(saved[1].output_dir) / "checkpoint-2", target)
    expected = f"resume: expected a complete checkpoint directory, got {target} ({lacks})"
    with pytest.raises(ValueError, match=re.escape(expected)):
        find_checkpoint(str(target), tmp_path)
    model, optimizer, scheduler = _states(saved)
    with pytest.raises(ValueError, match=r"^path: expected a complete checkpoint"):
        load_checkpoint(target, model, optimizer, scheduler)


def test_latest_without_a_complete_checkpoint(tmp_path, saved):
    with pytest.raises(ValueError, match=r"resume: expected a complete checkpoint-<step> .*none$"):
        find_checkpoint("latest", tmp_path)
    _incomplete(
        "weights_only", Path(saved[1].output_dir) / "checkpoint-2", tmp_path / "checkpoint-9"
    )
    with (
        pytest.warns(RuntimeWarning, match="checkpoint-9: no trainer_state.pt"),
        pytest.raises(ValueError, match=r"got none \(1 incomplete passed over\)"),
    ):
        find_checkpoint("latest", tmp_path)


def test_resume_latest_after_the_in_place_writer_died(tmp_path, saved):
    """What lenalign before crash-safe checkpoints left: the run resumes from checkpoint-1."""
    out = tmp_path / "run"
    _copy_checkpoints(saved, out, 1)
    _incomplete("weights_only", Path(saved[1].output_dir) / "checkpoint-2", out / "checkpoint-2")
    config = replace(saved[1], output_dir=str(out), resume="latest", save_steps=0)
    with pytest.warns(RuntimeWarning, match="checkpoint-2: no trainer_state.pt"):
        resumed = train(config)
    assert [r["step"] for r in resumed.train_log] == [2]
    for name, parameter in saved[0].model.state_dict().items():
        assert torch.equal(parameter, resumed.model.state_dict()[name]), name
    assert checkpoint_problem(out / "checkpoint-2") is None


def test_a_checkpoint_without_manifest_still_loads(tmp_path, saved):
    """A complete checkpoint of lenalign before manifests and rng_states."""
    legacy = tmp_path / "checkpoint-2"
    shutil.copytree(Path(saved[1].output_dir) / "checkpoint-2", legacy)
    (legacy / "checkpoint_manifest.json").unlink()
    state = torch.load(legacy / "trainer_state.pt", weights_only=True)
    rng = state.pop("rng_states")[0]
    torch.save(state | {"rng": rng["cpu"], "cuda_rng": rng["cuda"]}, legacy / "trainer_state.pt")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_checkpoint("latest", tmp_path) == legacy
    model, optimizer, scheduler = _states(saved)
    assert load_checkpoint(legacy, model, optimizer, scheduler) == 2
    assert torch.equal(torch.get_rng_state(), rng["cpu"])


def _states(saved):
    """A copy of the trained model, and an optimizer and schedule shaped as the trainer's."""
    model = copy.deepcopy(saved[0].model)
    groups = [[p for p in model.parameters() if p.dim() >= 2]]
    groups.append([p for p in model.parameters() if p.dim() < 2])
    optimizer = torch.optim.AdamW([{"params": group} for group in groups])
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def test_save_clears_leftovers_and_replaces_a_checkpoint(tmp_path, saved):
    out = tmp_path / "run"
    _copy_checkpoints(saved, out, 1, 2)
    pid, live = os.getpid(), os.getppid()
    shutil.copytree(out / "checkpoint-2", out / f".checkpoint-2.partial-{pid}")
    shutil.copytree(out / "checkpoint-2", out / f".checkpoint-3.partial-{live}")
    shutil.copytree(out / "checkpoint-1", out / f".checkpoint-1.replaced-{pid}")
    # a crash between the renames of a replace: the set-aside one stands in for its name
    shutil.copytree(out / "checkpoint-2", out / f".checkpoint-4.replaced-{pid}")
    with pytest.warns(RuntimeWarning, match=r"checkpoint-4 is missing .* taking .*replaced"):
        assert find_checkpoint("latest", out) == out / f".checkpoint-4.replaced-{pid}"

    model, optimizer, scheduler = _states(saved)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    tokenizer = saved[0].tokenizer
    assert save_checkpoint(out, model, tokenizer, optimizer, scheduler, 2, saved[1]) == (
        out / "checkpoint-2"
    )

    # ours and dead writers' leftovers are gone, a live process's is kept, step 4 is back
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [f".checkpoint-3.partial-{live}"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert checkpoint_problem(out / "checkpoint-4") is None
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2", local_files_only=True)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_a_save_under_way_is_left_alone(tmp_path, saved, monkeypatch):
    """A second save of the same process, during the first, spares the first's directory."""
    model, optimizer, scheduler = _states(saved)
    tokenizer = copy.deepcopy(saved[0].tokenizer)
    original = tokenizer.save_pretrained
    first = tmp_path / f".checkpoint-3.partial-{os.getpid()}"

    def save_and_nest(directory, *args, **kwargs):
        result = original(directory, *args, **kwargs)
        if Path(directory) == first:
            save_checkpoint(tmp_path, model, tokenizer, optimizer, scheduler, 4, saved[1])
            assert (first / "config.json").is_file()
        return result

    monkeypatch.setattr(tokenizer, "save_pretrained", save_and_nest)
    save_checkpoint(tmp_path, model, tokenizer, optimizer, scheduler, 3, saved[1])
    for step in (3, 4):
        assert checkpoint_problem(tmp_path / f"checkpoint-{step}") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_rng_states_of_several_ranks(tmp_path, saved):
    model, optimizer, scheduler = _states(saved)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(current_rng_state())
    args = (model, saved[0].tokenizer, optimizer, scheduler, 1, saved[1])
    path = save_checkpoint(tmp_path, *args, rng_states=states)
    for rank in (1, 0):
        load_checkpoint(path, model, optimizer, scheduler, rank=rank)
        assert torch.equal(torch.get_rng_state(), states[rank]["cpu"])
    with pytest.raises(ValueError, match=r"^rank: expected a rank below 2"):
        load_checkpoint(path, model, optimizer, scheduler, rank=2)
    with pytest.raises(ValueError, match=r"^rng_states: expected a non-empty list"):
        save_checkpoint(tmp_path, *args, rng_states=[])
