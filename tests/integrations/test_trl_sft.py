"""LenalignSFTTrainer against trl's SFTTrainer from the same seed and data: with
length_normalization="token" (the default) every logged metric and every parameter after
3 optimizer steps agree (relative 1e-4): padded with evaluation, completion-only, "dft"
with accumulation, packing, padding-free, LoRA, a Mixture-of-Experts model; the first
bf16 step. "sequence" and a lambda against a float64 formula on one batch; accumulation
of per-sequence means; a bad length_normalization refused by name; no [N, V] logits
formed in a step."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import LoraConfig
from torch.profiler import ProfilerActivity, profile
from trl import SFTConfig, SFTTrainer
from trl_helpers import (
    VocabRows,
    assert_same_history,
    assert_same_parameters,
    completion_dataset,
    first_batch,
    float64_copy,
    forbid_forward,
    make_sft,
    profiled_vocab_rows,
    text_dataset,
    tiny_mixtral,
    trained_sft,
)

from lenalign.integrations.trl import LenalignSFTConfig, LenalignSFTTrainer, sft
from lenalign.integrations.trl.head import HeadRequest
from lenalign.integrations.trl.sft import packed_cu_seqlens

SETTINGS = {
    "defaults, evaluation": {
        "eval_dataset": text_dataset(4, 1),
        "eval_strategy": "steps",
        "eval_steps": 2,
    },
    "completion only": {"dataset": completion_dataset(), "completion_only_loss": True},
    "dft, accumulation": {"loss_type": "dft", "gradient_accumulation_steps": 2},
    "packing bfd": {"packing": True, "max_length": 24, "per_device_train_batch_size": 2},
    "padding free": {"padding_free": True, "per_device_train_batch_size": 3},
    "lora, gradient checkpointing": {
        "peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "gradient_checkpointing": True,
    },
    "moe router loss, accumulation": {
        "model": lambda: tiny_mixtral(0),
        "gradient_accumulation_steps": 2,
    },
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_token_reproduces_sft_trainer(tmp_path, monkeypatch, settings):
    expected = trained_sft(SFTTrainer, SFTConfig, tmp_path / "trl", **settings)
    requests = []
    monkeypatch.setattr(
        sft, "HeadRequest", lambda *a, **k: requests.append(1) or HeadRequest(*a, **k)
    )
    got = trained_sft(LenalignSFTTrainer, LenalignSFTConfig, tmp_path / "lenalign", **settings)
    # every micro-batch (and evaluation batch) went through lenalign's head, not TRL's
    evaluated = 2 if "eval_dataset" in settings else 0
    assert len(requests) == 3 * settings.get("gradient_accumulation_steps", 1) + 2 * evaluated
    assert_same_history(expected, got)
    assert_same_parameters(expected.model, got.model)
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        assert key in got.state.log_history[0]
    if evaluated:
        assert any("eval_mean_token_accuracy" in entry for entry in got.state.log_history)
    if "model" in settings:
        assert "aux_loss" in got.state.log_history[0]


def test_bf16_autocast_step(tmp_path):
    # the first step's figures; later ones drift apart by bf16 rounding of the updates
    settings = {"bf16": True, "use_cpu": True, "max_steps": 1}
    expected = trained_sft(SFTTrainer, SFTConfig, tmp_path / "trl", **settings)
    got = trained_sft(LenalignSFTTrainer, LenalignSFTConfig, tmp_path / "lenalign", **settings)
    assert_same_history(expected, got)


def float64_loss(model64, batch: dict, exponent: float, dft: bool = False) -> torch.Tensor:
    """The mean over sequences of -sum / count**exponent in float64 from the model's own
    full logits, each packed sequence run alone (so attention cannot cross them)."""
    cu_seqlens = packed_cu_seqlens(batch)
    if cu_seqlens is None:
        rows = [
            (batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1], batch["labels"][i])
            for i in range(batch["input_ids"].shape[0])
        ]
    else:
        bounds = cu_seqlens.tolist()
        rows = [
            (batch["input_ids"][:, a:b], None, batch["labels"][0, a:b])
            for a, b in itertools.pairwise(bounds)
        ]
    scores = []
    for input_ids, attention_mask, labels in rows:
        logits = model64(input_ids=input_ids, attention_mask=attention_mask).logits[0, :-1]
        targets = labels[1:]
        mask = targets != -100
        picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[:, None])[:, 0]
        if dft:
            picked = picked * picked.detach().exp()
        if mask.any():
            scores.append((picked * mask).sum() / mask.sum().double() ** exponent)
    return -torch.stack(scores).mean()


NORMALIZATIONS = {
    "sequence padded": ("sequence", 1.0, {}),
    "0.5 padded": (0.5, 0.5, {}),
    "sequence packed": ("sequence", 1.0, {"padding_free": True, "per_device_train_batch_size": 3}),
    "0.25 completion only": (0.25, 0.25, {"dataset": completion_dataset()}),
    "sequence dft packed": (
        "sequence",
        1.0,
        {"loss_type": "dft", "padding_free": True, "per_device_train_batch_size": 3},
    ),
}


@pytest.mark.parametrize("case", NORMALIZATIONS.values(), ids=NORMALIZATIONS.keys())
def test_per_sequence_loss_matches_float64_formula(tmp_path, case):
    value, exponent, settings = case
    trainer = make_sft(
        LenalignSFTTrainer, LenalignSFTConfig, tmp_path, length_normalization=value, **settings
    )
    batch = first_batch(trainer)
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    model64 = float64_copy(model)
    expected = float64_loss(model64, batch, exponent, settings.get("loss_type") == "dft")
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    for (name, parameter), parameter64 in zip(
        model.named_parameters(), model64.parameters(), strict=True
    ):
        torch.testing.assert_close(
            parameter.grad.double(), parameter64.grad, rtol=1e-4, atol=1e-6, msg=name
        )


def test_sequence_weighs_each_micro_batch_equally(tmp_path):
    """With accumulation the per-sequence modes average the micro-batches' means: 2 x 2
    sequences per step train as 4 per step when every micro-batch has as many."""
    whole = trained_sft(
        LenalignSFTTrainer,
        LenalignSFTConfig,
        tmp_path / "whole",
        length_normalization="sequence",
        per_device_train_batch_size=4,
    )
    split = trained_sft(
        LenalignSFTTrainer,
        LenalignSFTConfig,
        tmp_path / "split",
        length_normalization="sequence",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    assert_same_parameters(whole.model, split.model)
    for a, b in zip(whole.state.log_history[:-1], split.state.log_history[:-1], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.parametrize("value", ["bogus", "mean", 1.5, -0.1, float("nan"), True, None])
def test_bad_length_normalization_is_refused_by_name(tmp_path, value):
    with pytest.raises(ValueError, match=r"^length_normalization: expected"):
        LenalignSFTConfig(str(tmp_path), bf16=False, length_normalization=value)


def test_length_normalization_values_and_refusals(tmp_path):
    assert LenalignSFTConfig(str(tmp_path), bf16=False).length_normalization == "token"
    config = LenalignSFTConfig(str(tmp_path), bf16=False, length_normalization="0.5")
    assert config.length_normalization == 0.5
    # per-sequence modes have no meaning for TRL's own loss paths
    with pytest.raises(ValueError, match=r"^length_normalization: expected 'token' with"):
        make_sft(
            LenalignSFTTrainer,
            LenalignSFTConfig,
            tmp_path,
            length_normalization="sequence",
            label_smoothing_factor=0.1,
        )


def test_no_vocab_logits_in_a_step(tmp_path):
    """No op output holds more vocabulary rows than the batch's counted labels (the LM
    head's module forward never runs); TRL's CPU head projects every position."""

    rows = {}
    for name, trainer_cls, config_cls in (
        ("lenalign", LenalignSFTTrainer, LenalignSFTConfig),
        ("trl", SFTTrainer, SFTConfig),
    ):
        trainer = make_sft(
            trainer_cls, config_cls, tmp_path / name, dataset=completion_dataset(), max_steps=1
        )
        if name == "lenalign":
            forbid_forward(trainer.model.get_output_embeddings())
        config = trainer.model.config
        bound = max(
            int((batch["labels"][:, 1:] != -100).sum()) for batch in trainer.get_train_dataloader()
        )
        with (
            profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof,
            VocabRows(config.vocab_size) as watch,
        ):
            trainer.train()
        profiled = profiled_vocab_rows(prof, config.vocab_size, config.hidden_size)
        rows[name] = (watch.rows, profiled, watch.padded, bound)
    watched, profiled, padded, bound = rows["lenalign"]
    assert padded == []
    assert 0 < profiled <= bound
    assert watched <= bound
    watched, profiled, _, bound = rows["trl"]
    assert profiled > bound


def test_command_line_values(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(LenalignSFTConfig)
    for text, value in (("sequence", "sequence"), ("0.5", 0.5), ("token", "token")):
        (config,) = parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--bf16", "False", "--length_normalization", text]
        )
        assert config.length_normalization == value
