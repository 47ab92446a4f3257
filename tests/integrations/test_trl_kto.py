"""LenalignKTOTrainer against TRL's own KTOTrainer on the tiny models: log history and
parameters equal with the defaults, the normalized scores against float64 formulas, and
no vocabulary-sized tensor in a step."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from torch.profiler import ProfilerActivity, profile
from transformers import HfArgumentParser
from trl import KTOConfig, KTOTrainer
from trl_helpers import (
    VocabRows,
    assert_same_history,
    assert_same_parameters,
    completion_scores,
    first_batch,
    float64_copy,
    forbid_forward,
    make_kto,
    profiled_vocab_rows,
    tiny_mixtral,
    tiny_model,
    tokenizer,
    trained_kto,
    unpaired_dataset,
)

from lenalign.integrations.trl import LenalignKTOConfig, LenalignKTOTrainer, fused_call

SETTINGS = {
    "defaults, evaluation": {
        "eval_dataset": unpaired_dataset(4, 1),
        "eval_strategy": "steps",
        "eval_steps": 2,
    },
    "weights, imbalanced, accumulation": {
        "dataset": unpaired_dataset(12, 2, desirable=0.3),
        "desirable_weight": 1.5,
        "undesirable_weight": 0.7,
        "gradient_accumulation_steps": 2,
    },
    "apo_zero_unpaired": {"loss_type": "apo_zero_unpaired"},
    "precomputed reference": {"precompute_ref_log_probs": True},
    "lora, reference by disabled adapter": {
        "ref_model": None,
        "peft_config": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    },
    "moe router loss": {"model": lambda: tiny_mixtral(0), "ref_model": tiny_mixtral(1)},
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_sum_reproduces_kto_trainer(tmp_path, monkeypatch, settings):
    expected = trained_kto(KTOTrainer, KTOConfig, tmp_path / "trl", **settings)
    answered = []
    score_head = fused_call._score_head
    monkeypatch.setattr(
        fused_call, "_score_head", lambda *a, **k: answered.append(1) or score_head(*a, **k)
    )
    got = trained_kto(LenalignKTOTrainer, LenalignKTOConfig, tmp_path / "lenalign", **settings)
    # every forward of the policy, the reference and the KL pairs went through lenalign
    assert len(answered) >= 3 * settings.get("gradient_accumulation_steps", 1) * 2
    assert_same_history(expected, got)
    assert_same_parameters(expected.model, got.model)
    for key in ("kl", "entropy", "logps/chosen", "rewards/rejected", "logits/chosen"):
        assert key in got.state.log_history[0], key
    if "model" in settings:
        assert "aux_loss" in got.state.log_history[0]


def test_model_by_path_with_reference_built_from_it(tmp_path):
    path = tmp_path / "model"
    tiny_model().save_pretrained(path)
    tokenizer().save_pretrained(path)
    # KTOTrainer loads the policy and a reference copy from the path; checkpointing on
    settings = {"model": str(path), "ref_model": None, "gradient_checkpointing": True}
    expected = trained_kto(KTOTrainer, KTOConfig, tmp_path / "trl", **settings)
    got = trained_kto(LenalignKTOTrainer, LenalignKTOConfig, tmp_path / "lenalign", **settings)
    assert got.ref_model is not None
    assert_same_history(expected, got)
    assert_same_parameters(expected.model, got.model)


def test_bf16_autocast_step_is_no_less_accurate(tmp_path):
    """The first bf16 autocast step's figures err from the float32 step's no more than
    KTOTrainer's do (twice theirs, plus 1e-4 of the value): KTO's KL estimate is a
    difference of sums, where the bf16 rounding of each trainer differs by more than the
    parity tolerance."""
    settings = {"use_cpu": True, "max_steps": 1}
    truth = trained_kto(KTOTrainer, KTOConfig, tmp_path / "fp32", **settings)
    theirs = trained_kto(KTOTrainer, KTOConfig, tmp_path / "trl", bf16=True, **settings)
    ours = trained_kto(
        LenalignKTOTrainer, LenalignKTOConfig, tmp_path / "lenalign", bf16=True, **settings
    )
    (truth,), (theirs,), (ours,) = (
        [entry for entry in run.state.log_history if "loss" in entry]
        for run in (truth, theirs, ours)
    )
    assert theirs["grad_norm"] != truth["grad_norm"]  # bf16 did round
    for key in ("loss", "grad_norm", "kl", "entropy", "logps/chosen", "rewards/rejected"):
        bound = 2 * abs(theirs[key] - truth[key]) + 1e-4 * max(1.0, abs(truth[key]))
        assert abs(ours[key] - truth[key]) <= bound, (key, truth[key], theirs[key], ours[key])


def test_plain_config_and_default_args(tmp_path):
    trainer = make_kto(LenalignKTOTrainer, KTOConfig, tmp_path, max_steps=1)
    assert trainer._exponent == 0.0
    assert "lenalign" in trainer.model.model_tags


def kto_loss64(policy64, reference64, batch, exponent, beta, weights, loss_type):
    """KTO's loss of a batch in float64, from the models' own full logits, every score
    sum / count**exponent (Ethayarajh et al. 2024, eq. 7; TRL's KL estimate: the mean
    log-ratio of the mismatched pairs, clamped at 0)."""
    policy, _, _ = completion_scores(policy64, batch, exponent)
    with torch.no_grad():
        reference, _, _ = completion_scores(reference64, batch, exponent)
        kl = torch.zeros((), dtype=torch.float64)
        if loss_type == "kto":
            kl_batch = {
                "input_ids": batch["KL_input_ids"],
                "attention_mask": batch["KL_attention_mask"],
                "completion_mask": batch["KL_completion_mask"],
            }
            kl_policy, _, _ = completion_scores(policy64, kl_batch, exponent)
            kl_reference, _, _ = completion_scores(reference64, kl_batch, exponent)
            kl = (kl_policy - kl_reference).mean().clamp(min=0)
    ratio = policy - reference
    desirable = batch["label"].bool()
    if loss_type == "kto":
        chosen = 1 - torch.sigmoid(beta * (ratio[desirable] - kl))
        rejected = 1 - torch.sigmoid(beta * (kl - ratio[~desirable]))
    else:
        chosen = 1 - torch.sigmoid(beta * ratio[desirable])
        rejected = torch.sigmoid(beta * ratio[~desirable])
    losses = torch.cat([weights[0] * chosen, weights[1] * rejected])
    return losses.mean(), kl


NORMALIZATIONS = {
    "mean": ("mean", 1.0, "kto"),
    "lambda 0.5": (0.5, 0.5, "kto"),
    "mean, apo_zero_unpaired": ("mean", 1.0, "apo_zero_unpaired"),
}


@pytest.mark.parametrize("case", NORMALIZATIONS.values(), ids=NORMALIZATIONS.keys())
def test_normalized_loss_matches_float64_formula(tmp_path, case):
    value, exponent, loss_type = case
    weights = (1.3, 0.8)
    trainer = make_kto(
        LenalignKTOTrainer,
        LenalignKTOConfig,
        tmp_path,
        length_normalization=value,
        loss_type=loss_type,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        per_device_train_batch_size=4,
    )
    batch = first_batch(trainer)
    assert 0 < int(batch["label"].sum()) < len(batch["label"])
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    policy64, reference64 = float64_copy(model), float64_copy(trainer.ref_model)
    expected, kl = kto_loss64(
        policy64, reference64, batch, exponent, trainer.beta, weights, loss_type
    )
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    if loss_type == "kto":
        assert trainer._metrics["train"]["kl"][-1] == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
    for (name, parameter), parameter64 in zip(
        model.named_parameters(), policy64.parameters(), strict=True
    ):
        torch.testing.assert_close(
            parameter.grad.double(), parameter64.grad, rtol=1e-4, atol=1e-6, msg=name
        )


def test_precomputed_reference_scores_are_normalized_and_keyed(tmp_path):
    """Precomputed reference scores are the normalized ones, and a cache of another
    normalization is never read back."""
    dataset = unpaired_dataset()
    stored = {}
    for value in ("sum", "mean"):
        trainer = make_kto(
            LenalignKTOTrainer,
            LenalignKTOConfig,
            tmp_path / value,
            dataset=dataset,
            precompute_ref_log_probs=True,
            length_normalization=value,
        )
        stored[value] = torch.tensor(trainer.train_dataset["ref_logps"])
        batch = first_batch(trainer)
        reference64 = float64_copy(trainer.ref_model)
        exponent = 0.0 if value == "sum" else 1.0
        with torch.no_grad():
            scores, _, _ = completion_scores(reference64, batch, exponent)
        torch.testing.assert_close(batch["ref_logps"].double(), scores, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stored["sum"], stored["mean"])


@pytest.mark.parametrize("value", ["bogus", "token", 1.5, -0.1, float("nan"), True, None])
def test_bad_length_normalization_is_refused_by_name(tmp_path, value):
    with pytest.raises(ValueError, match=r"^length_normalization: expected"):
        LenalignKTOConfig(str(tmp_path), bf16=False, length_normalization=value)


def test_command_line_values(tmp_path):
    parser = HfArgumentParser(LenalignKTOConfig)
    for text, value in (("mean", "mean"), ("0.5", 0.5), ("sum", "sum")):
        (config,) = parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--bf16", "False", "--length_normalization", text]
        )
        assert config.length_normalization == value


def test_no_vocab_logits_in_a_step(tmp_path):
    """No op output holds more vocabulary rows than a forward's counted labels (the LM
    head's module forward never runs); TRL's CPU head projects every position."""
    rows = {}
    for name, trainer_cls, config_cls in (
        ("lenalign", LenalignKTOTrainer, LenalignKTOConfig),
        ("trl", KTOTrainer, KTOConfig),
    ):
        trainer = make_kto(trainer_cls, config_cls, tmp_path / name, max_steps=1)
        if name == "lenalign":
            forbid_forward(trainer.model.get_output_embeddings())
            forbid_forward(trainer.ref_model.get_output_embeddings())
        config = trainer.model.config
        batch = first_batch(trainer)
        bound = max(
            int(batch[key][:, 1:].sum()) for key in ("completion_mask", "KL_completion_mask")
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
