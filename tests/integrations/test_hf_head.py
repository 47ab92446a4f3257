"""``fused_head_transform``: the head transforms of transformers' families, as
``linear_sequence_logprobs``'s two kwargs, checked against each model's own logits.

Each family is a tiny model built in code (tests/hf_head_models.py); the truth is the
float64 log-softmax of the model's own ``model(...).logits``, divided by the
temperature as sampling divides them, gathered at the labels.
"""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch
from hf_head_models import HEAD_FAMILIES, build_head_model

from lenalign import linear_sequence_logprobs
from lenalign.integrations.hf import fused_head_transform, transformers_at_least

VOCAB = 96
IDENTITY = {"logit_scale": 1.0, "logit_softcap": None}


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [3, 20] and labels with the first 6 positions (a prompt) ignored."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 20), generator=generator)
    labels = ids.clone()
    labels[:, :6] = -100
    return ids, labels


def true_logprobs(model, ids: torch.Tensor, labels: torch.Tensor, temperature: float):
    """[3, 19] log-probabilities of the labels under the model's own logits over the
    temperature, in float64 (0 where not counted), the label at t scored at t - 1."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    logprobs = torch.log_softmax(logits.double()[:, :-1] / temperature, dim=-1)
    targets = labels[:, 1:]
    counted = targets != -100
    gathered = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(counted, gathered, 0.0)


def fused_logprobs(model, ids: torch.Tensor, labels: torch.Tensor, transform: dict):
    """The same [3, 19] log-probabilities from the head's input alone, in float64."""
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        out = linear_sequence_logprobs(
            hidden,
            head.weight,
            labels,
            bias=head.bias,
            shift=True,
            return_token_logprobs=True,
            **transform,
        )
    # position t holds the label at t, scored by the logits at t - 1
    return out.token_logprobs[:, 1:].double()


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["t1", "t0.7"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("family", list(HEAD_FAMILIES))
def test_fused_head_reproduces_the_models_own_logits(family, dtype, temperature):
    model = build_head_model(family, VOCAB, seed=1).to(dtype)
    ids, labels = batch(seed=2)
    truth = true_logprobs(model, ids, labels, temperature)

    transform = fused_head_transform(model, temperature=temperature)
    expected = HEAD_FAMILIES[family][3]
    assert transform["logit_scale"] == pytest.approx(expected["logit_scale"] / temperature)
    if expected["logit_softcap"] is None:
        assert transform["logit_softcap"] is None
    else:
        assert transform["logit_softcap"] == pytest.approx(expected["logit_softcap"] / temperature)
    fused = fused_logprobs(model, ids, labels, transform)
    # float32: the two paths round differently (scale and temperature folded into one
    # factor, hidden states divided or logits); measured below 1e-7 of the largest
    atol = 1e-10 if dtype == torch.float64 else 1e-6 * float(truth.abs().max())
    torch.testing.assert_close(fused, truth, rtol=0, atol=atol)

    # not vacuous: the plain head, or for a head that ignores its config's field that
    # field applied, gives other log-likelihoods
    wrong = {**IDENTITY, "logit_scale": 0.3} if expected == IDENTITY else IDENTITY
    if temperature == 1.0:
        other = fused_logprobs(model, ids, labels, wrong)
        assert (other - truth).abs().max() > 1.0


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "1"])
def test_temperature_must_be_a_positive_finite_number(value):
    model = build_head_model("granite", VOCAB, seed=0)
    with pytest.raises(ValueError, match=r"^temperature: expected a finite number > 0, got "):
        fused_head_transform(model, temperature=value)


@pytest.mark.parametrize(
    ("family", "field", "value"),
    [
        ("granite", "logits_scaling", 0),
        ("cohere", "logit_scale", -0.5),
        ("gemma2", "final_logit_softcapping", math.inf),
    ],
)
def test_a_transform_field_must_be_a_positive_finite_number(family, field, value):
    model = build_head_model(family, VOCAB, seed=0)
    setattr(model.config, field, value)
    message = rf"^fused_head: config.{field}: expected a finite number > 0, got {value}"
    with pytest.raises(ValueError, match=message):
        fused_head_transform(model)


def test_a_scale_and_a_cap_in_an_unchecked_order_are_refused():
    # Gemma 2's head caps and never scales: with a scale field set as well, which comes
    # first is not known, and two kwargs that scale first would be a guess
    model = build_head_model("gemma2", VOCAB, seed=0)
    model.config.logit_scale = 1.0  # a no-op scale is no order to guess
    assert fused_head_transform(model) == {"logit_scale": 1.0, "logit_softcap": 3.0}
    model.config.logit_scale = 0.5
    message = (
        r"^fused_head: expected a model whose head scales then caps its logits .*"
        r"got model type 'gemma2' with logit_scale=0.5 and final_logit_softcapping=3.0"
    )
    with pytest.raises(ValueError, match=message):
        fused_head_transform(model)


def test_a_head_that_is_not_linear_is_refused():
    model = build_head_model("granite", VOCAB, seed=0)
    model.lm_head = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"^fused_head: expected .* nn.Linear, got Identity$"):
        fused_head_transform(model)


class RemoteMptConfig:
    """Stands in for MosaicML's remote-code MPTConfig: model type "mpt", a class of its
    own (not transformers' MptConfig), and a head that multiplies by logit_scale."""

    model_type = "mpt"

    def __init__(self, logit_scale: object) -> None:
        self.logit_scale = logit_scale

    def get_text_config(self) -> RemoteMptConfig:
        return self


class RemoteModel:
    def __init__(self, config: RemoteMptConfig) -> None:
        self.config = config
        self.head = torch.nn.Linear(4, 8, bias=False)

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.head


def test_a_remote_code_mpt_config_scales_and_transformers_one_does_not():
    assert fused_head_transform(RemoteModel(RemoteMptConfig(0.25))) == {
        "logit_scale": 0.25,
        "logit_softcap": None,
    }
    # MosaicML's symbolic scale is not a number this can reproduce
    message = r"^fused_head: config.logit_scale: expected .*, got 'inv_sqrt_d_model'$"
    with pytest.raises(ValueError, match=message):
        fused_head_transform(RemoteModel(RemoteMptConfig("inv_sqrt_d_model")))
    assert fused_head_transform(build_head_model("mpt", VOCAB, seed=0)) == IDENTITY


# TRL reads text_config.logit_scale wherever it is set: Aya Vision's head and
# transformers' MPT do not apply theirs, so TRL's scores of those two are not the model's
TRL_READS_RIGHT = [family for family in HEAD_FAMILIES if family not in ("aya_vision", "mpt")]


@pytest.mark.parametrize("family", TRL_READS_RIGHT)
def test_the_transform_is_the_one_of_trls_fused_head(family):
    pytest.importorskip("trl")
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "add_fused_lm_head"):
        pytest.skip("this trl has no add_fused_lm_head (added in trl 1.16)")
    ids, labels = batch(seed=2)
    ours = fused_logprobs(
        build_head_model(family, VOCAB, seed=1).double(),
        ids,
        labels,
        fused_head_transform(build_head_model(family, VOCAB, seed=1), temperature=0.7),
    )
    model = build_head_model(family, VOCAB, seed=1).double()
    trl_utils.add_fused_lm_head(model, temperature=0.7)
    with torch.no_grad():
        theirs = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    # TRL transforms the logits in float32 whatever their dtype
    torch.testing.assert_close(theirs.double(), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("installed", "applies"),
    [("5.24.0", False), ("5.25.0.dev0", True), ("5.25.0", True), ("6.0.0", True)],
)
def test_aya_visions_logit_scale_follows_the_installed_transformers(
    monkeypatch, installed, applies
):
    # transformers 5.25's Aya Vision head multiplies by text_config.logit_scale; before, the
    # head ignored it, and so must the mapping
    real_version = importlib.metadata.version

    def version(name):
        return installed if name == "transformers" else real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    transformers_at_least.cache_clear()
    try:
        model = build_head_model("aya_vision", VOCAB, seed=1)
        assert fused_head_transform(model)["logit_scale"] == (0.3 if applies else 1.0)
    finally:
        transformers_at_least.cache_clear()
