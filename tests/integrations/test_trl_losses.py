"""Every loss type on one batch: with "sum" each of DPOTrainer's equals DPOTrainer's own
(loss and every recorded metric), f-divergences, WPO weighting and LD-DPO included;
with "mean" each one changes but "sft" (a token mean already); and lambda = 0.5, SimPO
and R-DPO against float64 formulas written here, with a reference that differs from the
policy."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn.functional import logsigmoid
from trl import DPOConfig, DPOTrainer
from trl_helpers import (
    assert_close_metrics,
    completion_scores,
    first_batch,
    float64_copy,
    make_trainer,
)

from lenalign.integrations.trl import LenalignDPOConfig, LenalignDPOTrainer
from lenalign.integrations.trl.config import TRL_LOSS_TYPES

# what a loss type needs besides the defaults: EXO a label smoothing > 0, robust and the
# AOT losses are read with one too
SETTINGS = {
    "exo_pair": {"label_smoothing": 1e-3},
    "robust": {"label_smoothing": 0.1},
    "aot": {"label_smoothing": 0.1},
    "aot_unpaired": {"label_smoothing": 0.1},
}
CASES = {name: {"loss_types": [name], **SETTINGS.get(name, {})} for name in TRL_LOSS_TYPES}
CASES |= {
    "sigmoid forward_kl": {"loss_types": ["sigmoid"], "f_divergence_type": "forward_kl"},
    "ipo js_divergence": {"loss_types": ["ipo"], "f_divergence_type": "js_divergence"},
    "hinge alpha_divergence": {
        "loss_types": ["hinge"],
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": 0.3,
    },
    "sigmoid ld_alpha": {"loss_types": ["sigmoid"], "ld_alpha": 0.4},
    "mpo-style list": {
        "loss_types": ["sigmoid", "bco_pair", "sft"],
        "loss_weights": [0.8, 0.2, 1.0],
    },
}


def recorded(trainer) -> dict[str, float]:
    return {key: values[-1] for key, values in trainer._metrics["train"].items()}


def loss_and_metrics(trainer, batch, case: dict) -> tuple[float, dict[str, float]]:
    """The trainer's loss of ``batch`` and its metrics under ``case``'s attributes."""
    attributes = {"loss_weights": [1.0] * len(case["loss_types"]), "ld_alpha": None}
    attributes |= {"label_smoothing": 0.0, "f_divergence_type": "reverse_kl"}
    attributes |= {"f_alpha_divergence_coef": 0.5} | case
    for name, value in attributes.items():
        setattr(trainer, name, value)
    trainer._metrics["train"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return loss.item(), recorded(trainer)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    root = tmp_path_factory.mktemp("losses")
    ours = make_trainer(LenalignDPOTrainer, LenalignDPOConfig, root / "lenalign")
    theirs = make_trainer(DPOTrainer, DPOConfig, root / "trl")
    return theirs, ours, first_batch(ours)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_loss_type_with_sum_is_dpo_trainers(trainers, case):
    theirs, ours, batch = trainers
    expected_loss, expected_metrics = loss_and_metrics(theirs, batch, case)
    got_loss, got_metrics = loss_and_metrics(ours, batch, case)
    assert math.isclose(got_loss, expected_loss, rel_tol=1e-5, abs_tol=1e-7)
    assert_close_metrics(expected_metrics, got_metrics, skip=("num_tokens",))


def test_wpo_weighting_is_dpo_trainers(tmp_path):
    # TRL asks its kernel for log_sum_sq_probs only when built with use_weighting
    theirs = make_trainer(DPOTrainer, DPOConfig, tmp_path / "trl", use_weighting=True)
    ours = make_trainer(
        LenalignDPOTrainer, LenalignDPOConfig, tmp_path / "ours", use_weighting=True
    )
    batch = first_batch(ours)
    case = {"loss_types": ["sigmoid", "hinge"]}
    expected_loss, expected_metrics = loss_and_metrics(theirs, batch, case)
    got_loss, got_metrics = loss_and_metrics(ours, batch, case)
    assert math.isclose(got_loss, expected_loss, rel_tol=1e-5)
    assert_close_metrics(expected_metrics, got_metrics, skip=("num_tokens",))


@pytest.mark.parametrize("name", [n for n in TRL_LOSS_TYPES if n not in ("ipo", "sigmoid_norm")])
def test_mean_changes_every_loss_type_but_sft(trainers, name):
    _, ours, batch = trainers
    case = {"loss_types": [name], **SETTINGS.get(name, {})}
    summed, _ = loss_and_metrics(ours, batch, case)
    settings = ours._length
    ours._length = dataclasses.replace(settings, exponent=1.0)
    try:
        averaged, metrics = loss_and_metrics(ours, batch, case)
    finally:
        ours._length = settings
    assert math.isfinite(averaged)
    # sft is the token-mean NLL of the chosen tokens whatever the normalization
    assert (averaged == summed) == (name == "sft")
    # logged log-likelihoods stay summed under "mean"
    assert metrics["logps/chosen"] < -5


def formula_case(tmp_path, **settings):
    """A trainer, its first batch, the loss it computes, and float64 scores of policy and
    reference at the trainer's lambda (the reference differs from the policy)."""
    trainer = make_trainer(LenalignDPOTrainer, LenalignDPOConfig, tmp_path, **settings)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    exponent = trainer._length.exponent
    policy64 = float64_copy(trainer.model)
    policy = completion_scores(policy64, batch, exponent)
    reference = None
    if trainer.ref_model is not None:
        with torch.no_grad():
            reference = completion_scores(float64_copy(trainer.ref_model), batch, exponent)
    return trainer, loss, policy64, policy, reference


def assert_same_gradients(model, model64, loss64):
    loss64.backward()
    expected = dict(model64.named_parameters())
    for name, parameter in model.named_parameters():
        truth = expected[name].grad
        scale = truth.abs().max().item()
        torch.testing.assert_close(
            parameter.grad.double(), truth, rtol=1e-4, atol=1e-5 * scale, msg=name
        )


def pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return values.chunk(2, dim=0)


def test_lambda_half_against_float64(tmp_path):
    beta = 0.3
    trainer, loss, model64, policy, reference = formula_case(
        tmp_path, length_normalization=0.5, beta=beta
    )
    (chosen, rejected), (ref_chosen, ref_rejected) = pairs(policy[0]), pairs(reference[0])
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    assert margin.abs().min() > 1e-3  # the reference differs: the test tests something
    loss64 = -logsigmoid(beta * margin).mean()
    assert math.isclose(loss.item(), float(loss64), rel_tol=1e-5)
    loss.backward()
    assert_same_gradients(trainer.model, model64, loss64)
    metrics = recorded(trainer)
    # rewards: beta times the log-ratio of the scores the loss compares
    expected_reward = float(beta * (chosen - ref_chosen).mean())
    assert math.isclose(metrics["rewards/chosen"], expected_reward, rel_tol=1e-5)
    # logps: the summed log-likelihoods, as DPOTrainer logs them
    summed_chosen, _ = pairs(policy[1])
    assert math.isclose(metrics["logps/chosen"], float(summed_chosen.mean()), rel_tol=1e-5)


def test_simpo_against_float64(tmp_path):
    beta, gamma = 2.0, 0.7
    trainer, loss, model64, policy, _ = formula_case(
        tmp_path, loss_type=["simpo"], length_normalization="mean", beta=beta, simpo_gamma=gamma
    )
    assert trainer.ref_model is None  # reference-free: released, never run
    chosen, rejected = pairs(policy[0])
    loss64 = -logsigmoid(beta * (chosen - rejected) - gamma).mean()
    assert math.isclose(loss.item(), float(loss64), rel_tol=1e-5)
    loss.backward()
    assert_same_gradients(trainer.model, model64, loss64)
    metrics = recorded(trainer)
    assert math.isclose(metrics["rewards/chosen"], float(beta * chosen.mean()), rel_tol=1e-5)


def test_rdpo_against_float64(tmp_path):
    beta, alpha = 0.2, 0.05
    _, loss, _, policy, reference = formula_case(
        tmp_path, loss_type=["rdpo"], beta=beta, rdpo_alpha=alpha
    )
    (chosen, rejected), (ref_chosen, ref_rejected) = pairs(policy[0]), pairs(reference[0])
    chosen_length, rejected_length = pairs(policy[2])
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    loss64 = -logsigmoid(beta * margin + alpha * (chosen_length - rejected_length)).mean()
    assert math.isclose(loss.item(), float(loss64), rel_tol=1e-5)
