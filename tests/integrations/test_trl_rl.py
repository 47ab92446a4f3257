"""LenalignGRPOTrainer and LenalignRLOOTrainer against TRL's GRPOTrainer and RLOOTrainer.

Tiny Llama and byte tokenizer built in code, 8 prompts, a fixed reward function, TRL's
own in-process generation (sampling seeded by the config's seed), plain SGD. Each pair
of runs starts from the same weights and seed, so the first generations are the same;
later ones are sampled from weights that agree to float rounding, and so are the same
too (a different sample would show at once in the rewards). What is compared is then
the scoring and the loss: ``log_history`` and every parameter after 3 steps, within
trl_helpers' RTOL. RLOO's "mean" and lambda are held to float64 formulas written here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from rl_helpers import COMPLETION_TOKENS, RL_FIELDS, make_rl, saved_tiny_model
from torch.profiler import ProfilerActivity, profile
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl_helpers import (
    assert_same_history,
    assert_same_parameters,
    config_kwargs,
    float64_copy,
    profiled_vocab_rows,
    tiny_model,
)

from lenalign.integrations.trl import (
    LenalignGRPOConfig,
    LenalignGRPOTrainer,
    LenalignRLOOConfig,
    LenalignRLOOTrainer,
)
from lenalign.integrations.trl.fused_call import LenalignFusedOutput


def both(tmp_path: Path, kind: str, **overrides):
    """TRL's trainer and lenalign's, each trained 3 steps from the same start."""
    classes = {
        "grpo": ((GRPOTrainer, GRPOConfig), (LenalignGRPOTrainer, LenalignGRPOConfig)),
        "rloo": ((RLOOTrainer, RLOOConfig), (LenalignRLOOTrainer, LenalignRLOOConfig)),
    }[kind]
    runs = []
    for name, (trainer_cls, config_cls) in zip(("trl", "lenalign"), classes, strict=True):
        model = None
        if overrides.get("beta", 0.0) != 0.0 and "peft_config" not in overrides:
            model = saved_tiny_model(tmp_path / f"model-{name}")
        trainer = make_rl(trainer_cls, config_cls, tmp_path / name, model=model, **overrides)
        trainer.train()
        runs.append(trainer)
    return runs


LORA = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
GRPO_SETTINGS = {
    # every loss type at the token level (luspo: its sequence level)
    **{
        loss: {"loss_type": loss}
        for loss in ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "vespo")
    },
    "luspo, sequence": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "grpo, sequence (GSPO)": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    "sapo, sequence": {"loss_type": "sapo", "importance_sampling_level": "sequence"},
    "beta 0.04, reference from path": {"beta": 0.04},
    "2 iterations, 2 accumulated": {"num_iterations": 2, "gradient_accumulation_steps": 2},
    "top_entropy_quantile 0.5": {"top_entropy_quantile": 0.5},
    "LoRA, beta 0.04, reference the disabled adapter": {"beta": 0.04, "peft_config": LORA},
    "temperature 0.7, float32 head": {"temperature": 0.7, "cast_lm_head_to_fp32": True},
}


@pytest.mark.parametrize("settings", GRPO_SETTINGS.values(), ids=GRPO_SETTINGS.keys())
def test_grpo_trains_as_trl(tmp_path, settings):
    expected, got = both(tmp_path, "grpo", **settings)
    assert_same_history(expected, got)
    assert_same_parameters(expected.model, got.model)
    # the comparison is of trained runs: the policy moved
    assert expected.state.log_history[0]["grad_norm"] > 0


RLOO_SETTINGS = {
    "default beta, reference from path": {"beta": 0.05},
    "beta 0": {"beta": 0.0},
    "LoRA, reference the disabled adapter": {"beta": 0.05, "peft_config": LORA},
}


@pytest.mark.parametrize("settings", RLOO_SETTINGS.values(), ids=RLOO_SETTINGS.keys())
def test_rloo_trains_as_trl(tmp_path, settings):
    expected, got = both(tmp_path, "rloo", **settings)
    assert_same_history(expected, got)
    assert_same_parameters(expected.model, got.model)
    assert expected.state.log_history[0]["grad_norm"] > 0


def test_entropy_bonus_refused(tmp_path):
    """lenalign's entropy has no gradient: GRPO's entropy bonus is refused by name, in
    the config and in the trainer given a plain GRPOConfig."""
    fields = config_kwargs(tmp_path, **RL_FIELDS)
    with pytest.raises(ValueError, match=r"^entropy_coef: expected 0.0"):
        LenalignGRPOConfig(**fields, entropy_coef=0.01)
    with pytest.raises(ValueError, match=r"^use_adaptive_entropy: expected False"):
        LenalignGRPOConfig(**fields, use_adaptive_entropy=True)
    with pytest.raises(ValueError, match=r"^entropy_coef: expected 0.0"):
        make_rl(LenalignGRPOTrainer, GRPOConfig, tmp_path, entropy_coef=0.01)


def test_rloo_length_normalization_refused(tmp_path):
    fields = config_kwargs(tmp_path, **RL_FIELDS)
    with pytest.raises(ValueError, match=r"^length_normalization"):
        LenalignRLOOConfig(**fields, length_normalization=1.5)
    with pytest.raises(ValueError, match=r"^length_normalization"):
        LenalignRLOOConfig(**fields, length_normalization="median")


@pytest.mark.parametrize("normalization", ["mean", 0.5])
def test_rloo_normalized_scores_against_float64(tmp_path, normalization):
    """RLOO with ``length_normalization``: every per-token log-probability RLOOTrainer
    sums (policy, old policy and reference) is the float64 one divided by the
    completion's token count**lambda, and the first SGD step's update is the float64
    gradient of RLOO's loss on the normalized scores."""
    exponent = 1.0 if normalization == "mean" else normalization
    path = saved_tiny_model(tmp_path / "model")
    trainer = make_rl(
        LenalignRLOOTrainer,
        LenalignRLOOConfig,
        tmp_path / "run",
        model=path,
        length_normalization=normalization,
        max_steps=1,
        max_grad_norm=0.0,  # no clipping: the step is -lr x the gradient
    )
    start = float64_copy(trainer.model)
    reference = float64_copy(trainer.ref_model)
    scored, losses = [], []
    score, compute_loss = trainer._get_per_token_logps_and_entropies, trainer._compute_loss

    def recorded_score(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = score(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        scored.append((model, input_ids, attention_mask, logits_to_keep, out[0].detach()))
        return out

    def recorded_loss(model, inputs):
        losses.append(inputs)
        return compute_loss(model, inputs)

    trainer._get_per_token_logps_and_entropies = recorded_score
    trainer._compute_loss = recorded_loss
    trainer.train()

    def truth(model64, input_ids, attention_mask, keep):
        """[B, keep] float64 log-probabilities of the completion tokens over count**lambda."""
        logits = model64(input_ids=input_ids, attention_mask=attention_mask).logits.double()
        logits = logits[:, -keep - 1 : -1] / trainer.args.temperature
        targets = input_ids[:, -keep:]
        token = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        mask = attention_mask[:, -keep:].double()
        count = mask.sum(-1, keepdim=True).clamp(min=1)
        return token * mask / count**exponent, mask

    policy = trainer.accelerator.unwrap_model(trainer.model)
    models = {id(trainer.model): start, id(policy): start, id(trainer.ref_model): reference}
    assert {id(entry[0]) for entry in scored} >= {id(trainer.ref_model)}
    for model, input_ids, attention_mask, keep, got in scored:
        with torch.no_grad():
            expected, mask = truth(models[id(model)], input_ids, attention_mask, keep)
        torch.testing.assert_close((got * mask).double(), expected, rtol=1e-5, atol=1e-6)

    (inputs,) = losses
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    token, _ = truth(start, input_ids, attention_mask, inputs["completion_ids"].shape[1])
    ratio = torch.exp(token.sum(-1) - inputs["old_logps"].double())
    advantages = inputs["advantages"].double()
    low, high = 1 - trainer.epsilon_low, 1 + trainer.epsilon_high
    loss = -torch.min(ratio * advantages, ratio.clamp(low, high) * advantages).mean()
    loss.backward()
    trained = dict(policy.named_parameters())
    moved = 0.0
    for name, parameter in start.named_parameters():
        step = trained[name].detach().double() - parameter.detach()
        expected_step = -trainer.args.learning_rate * parameter.grad
        torch.testing.assert_close(step, expected_step, rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, float(step.abs().max()))
    assert moved > 0
    assert math.isfinite(loss.item())


def test_grpo_step_forms_no_vocabulary_wide_scores(tmp_path):
    """A profiled GRPO step (policy, old policy and reference scored): lenalign's ops
    take no [*, V] tensor larger than the completion tokens of a batch, where TRL's CPU
    path scores every position of every row; generation's own [B, V] logits aside."""
    rows = {}
    for name, trainer_cls, config_cls in (
        ("trl", GRPOTrainer, GRPOConfig),
        ("lenalign", LenalignGRPOTrainer, LenalignGRPOConfig),
    ):
        path = saved_tiny_model(tmp_path / f"model-{name}")
        # 2 iterations per generation: the old policy is scored too
        trainer = make_rl(
            trainer_cls,
            config_cls,
            tmp_path / name,
            model=path,
            beta=0.04,
            num_iterations=2,
            max_steps=1,
        )
        config = trainer.model.config
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            trainer.train()
        rows[name] = profiled_vocab_rows(prof, config.vocab_size, config.hidden_size)
    bound = RL_FIELDS["per_device_train_batch_size"] * COMPLETION_TOKENS
    assert 0 < rows["lenalign"] <= bound
    assert rows["trl"] > bound


def fused_call_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """[2, 9] ids and labels, the first 4 positions unscored (5 scored per row)."""
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    return ids, ids.masked_fill(torch.arange(9) < 4, -100)


def test_second_trainer_on_the_same_model(tmp_path):
    """Each TRL trainer wraps the model's forward with its own head on top: a second
    lenalign trainer on the same model object, with another length normalization,
    answers the calls again, with its own settings."""
    model = tiny_model()
    for normalization in ("sum", "mean"):
        make_rl(
            LenalignRLOOTrainer,
            LenalignRLOOConfig,
            tmp_path / normalization,
            model=model,
            beta=0.0,
            length_normalization=normalization,
        )
    ids, labels = fused_call_inputs()
    with torch.no_grad():
        output = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert isinstance(output, LenalignFusedOutput)
    torch.testing.assert_close(output.log_probs.sum(-1), output.sequence.mean)


def test_float32_head_on_a_bfloat16_model(tmp_path):
    """``cast_lm_head_to_fp32`` on a bfloat16 model: lenalign's per-token log-probabilities
    are GRPOTrainer's (both project in float32); projecting in bfloat16 instead would
    differ by far more, so the comparison sees the setting."""
    ids, labels = fused_call_inputs()
    answers = {}
    for name, trainer_cls, config_cls, cast in (
        ("trl", GRPOTrainer, GRPOConfig, True),
        ("lenalign", LenalignGRPOTrainer, LenalignGRPOConfig, True),
        ("lenalign, bf16 head", LenalignGRPOTrainer, LenalignGRPOConfig, False),
    ):
        model = tiny_model().to(torch.bfloat16)
        make_rl(trainer_cls, config_cls, tmp_path / name, model=model, cast_lm_head_to_fp32=cast)
        with torch.no_grad():
            answers[name] = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert answers["lenalign"].dtype == torch.float32
    torch.testing.assert_close(answers["lenalign"], answers["trl"], rtol=0, atol=1e-5)
    # measured: 4.3e-4 with the bfloat16 head, the tiny model's logits being small
    assert (answers["lenalign, bf16 head"] - answers["trl"]).abs().max() > 1e-4
