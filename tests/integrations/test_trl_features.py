"""DPOTrainer's features keep working after the switch, each checked against DPOTrainer
from the same seed: a PEFT model whose reference is the adapter disabled (with gradient
checkpointing), precomputed reference log-probs, gradient accumulation with evaluation,
a model given by path with ref_model None, bf16 autocast, a Mixture-of-Experts model's
router loss; and save_model and resuming a checkpoint."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer
from trl_helpers import (
    assert_close_metrics,
    assert_same_history,
    assert_same_parameters,
    make_trainer,
    preference_dataset,
    tiny_mixtral,
    tiny_model,
    tokenizer,
    trained,
)

from lenalign.integrations.trl import LenalignDPOConfig, LenalignDPOTrainer


def both(tmp_path, **kwargs):
    """DPOTrainer and LenalignDPOTrainer, trained alike; ``kwargs`` may hold factories
    (callables) for the objects that each run needs its own of."""

    def run(trainer_cls, config_cls, name):
        built = {key: value() if callable(value) else value for key, value in kwargs.items()}
        return trained(trainer_cls, config_cls, tmp_path / name, **built)

    return run(DPOTrainer, DPOConfig, "trl"), run(LenalignDPOTrainer, LenalignDPOConfig, "ours")


def lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def test_peft_reference_is_the_adapter_disabled(tmp_path):
    expected, got = both(tmp_path, ref_model=None, peft_config=lora, gradient_checkpointing=True)
    assert got.ref_model is None
    assert_same_history(expected, got)
    assert_same_parameters(expected.model, got.model)


def test_precomputed_reference_log_probs(tmp_path):
    expected, got = both(tmp_path, ref_model=lambda: tiny_model(1), precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in got.train_dataset.column_names
    torch.testing.assert_close(
        torch.tensor(got.train_dataset["ref_chosen_logps"]),
        torch.tensor(expected.train_dataset["ref_chosen_logps"]),
        rtol=1e-5,
        atol=1e-5,
    )
    assert_same_history(expected, got)
    assert_same_parameters(expected.model, got.model)


def test_gradient_accumulation_and_evaluation(tmp_path):
    expected, got = both(
        tmp_path,
        ref_model=lambda: tiny_model(1),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        eval_dataset=lambda: preference_dataset(4, seed=1),
        eval_strategy="steps",
        eval_steps=2,
    )
    assert any("eval_rewards/margins" in entry for entry in got.state.log_history)
    assert_same_history(expected, got)
    assert_same_parameters(expected.model, got.model)


def test_model_by_path_with_reference_built_from_it(tmp_path):
    path = tmp_path / "model"
    tiny_model().save_pretrained(path)
    tokenizer().save_pretrained(path)
    # DPOTrainer loads the policy and a reference copy from the path; checkpointing on,
    # TRL's default
    expected, got = both(tmp_path, model=str(path), ref_model=None, gradient_checkpointing=True)
    assert got.ref_model is not None
    assert_same_history(expected, got)
    assert_same_parameters(expected.model, got.model)


def test_bf16_autocast_step(tmp_path):
    # the first step's figures; later ones drift apart by bf16 rounding of the updates
    expected, got = both(tmp_path, bf16=True, use_cpu=True, max_steps=1)
    assert_close_metrics(expected.state.log_history[0], got.state.log_history[0])


def test_mixture_of_experts_router_loss(tmp_path):
    expected, got = both(tmp_path, model=lambda: tiny_mixtral(0), ref_model=lambda: tiny_mixtral(1))
    assert "aux_loss" in got.state.log_history[0]
    assert_same_history(expected, got)
    assert_same_parameters(expected.model, got.model)


@pytest.mark.parametrize("padding_free", [False, True])
def test_save_model_and_resume(tmp_path, padding_free):
    settings = {"padding_free": padding_free, "length_normalization": "mean", "beta": 1.0}
    straight = trained(LenalignDPOTrainer, LenalignDPOConfig, tmp_path / "straight", **settings)
    saving = tmp_path / "saving"
    trained(
        LenalignDPOTrainer,
        LenalignDPOConfig,
        saving,
        save_strategy="steps",
        save_steps=2,
        **settings,
    )
    resumed = make_trainer(LenalignDPOTrainer, LenalignDPOConfig, saving, **settings)
    resumed.train(resume_from_checkpoint=str(saving / "checkpoint-2"))
    assert resumed.state.global_step == 3
    assert_same_parameters(straight.model, resumed.model)
    assert resumed.args.length_normalization == "mean"

    resumed.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert_same_parameters(straight.model, reloaded)
