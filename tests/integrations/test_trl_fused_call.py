"""answer_fused_calls against TRL's own add_fused_lm_head on the same model and batch:
every field of FusedCausalLMOutput, and the gradients of a loss on the log-probabilities.
"""

from __future__ import annotations

import copy

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head
from trl_helpers import tiny_mixtral, tiny_model

from lenalign.integrations.trl.fused_call import answer_fused_calls

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded rows of random tokens; labels -100 on the padding and the prompts."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    attention_mask[2, :1] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    return input_ids, attention_mask, labels


def both(model_fn, temperature: float = 1.0, **kwargs):
    """TRL's fused head and lenalign's answer, on two copies of the same model."""
    trl_model = model_fn()
    add_fused_lm_head(trl_model, temperature=temperature, outputs=FIELDS[:5])
    ours = copy.deepcopy(model_fn())
    add_fused_lm_head(ours, temperature=temperature)
    answer_fused_calls(ours, temperature=temperature, **kwargs)
    return trl_model, ours


def outputs(model, input_ids, attention_mask, labels, **kwargs):
    model.zero_grad()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        fused_lm_head=True,
        **kwargs,
    )
    # a loss that weighs every token differently, so that the gradient sees each log-prob
    weights = torch.linspace(0.5, 1.5, out.log_probs.numel()).view_as(out.log_probs)
    ((out.log_probs * weights).sum() + out.loss).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_every_field_and_gradient_equal_trl(temperature):
    trl_model, ours = both(tiny_model, temperature)
    input_ids, attention_mask, labels = batch(trl_model.config.vocab_size)
    expected, expected_grads = outputs(trl_model, input_ids, attention_mask, labels)
    got, got_grads = outputs(ours, input_ids, attention_mask, labels)
    for name in FIELDS:
        want, have = getattr(expected, name), getattr(got, name)
        assert have.shape == want.shape and have.dtype == want.dtype, name
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the per-sequence view: sums and counts of the counted labels
    torch.testing.assert_close(got.sequence.sum, expected.log_probs.sum(-1).detach())
    assert torch.equal(got.sequence.count, expected.label_mask.sum(-1))


def test_shift_labels_and_num_items_in_batch():
    trl_model, ours = both(tiny_model)
    input_ids, attention_mask, labels = batch(trl_model.config.vocab_size, seed=1)
    shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    kwargs = {"shift_labels": shift_labels, "num_items_in_batch": torch.tensor(40)}
    expected, expected_grads = outputs(trl_model, input_ids, attention_mask, None, **kwargs)
    got, got_grads = outputs(ours, input_ids, attention_mask, None, **kwargs)
    assert got.log_probs.shape == expected.log_probs.shape == labels.shape
    torch.testing.assert_close(got.log_probs, expected.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_router_loss_of_a_mixture_of_experts():
    trl_model, ours = both(lambda: tiny_mixtral(0))
    input_ids, attention_mask, labels = batch(trl_model.config.vocab_size, seed=2)
    kwargs = {"output_router_logits": True}
    expected, _ = outputs(trl_model, input_ids, attention_mask, labels, **kwargs)
    got, _ = outputs(ours, input_ids, attention_mask, labels, **kwargs)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exponent", [0.5, 1.0])
def test_length_exponent_makes_the_row_sum_the_normalized_score(exponent):
    model = tiny_model().double()
    answer_fused_calls(model, length_exponent=exponent)
    input_ids, attention_mask, labels = batch(model.config.vocab_size, seed=3)
    got = model(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True
    )
    # float64 truth from the model's own logits
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    token = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask
    expected = token.sum(-1) / mask.sum(-1).double() ** exponent
    torch.testing.assert_close(got.log_probs.sum(-1), expected, rtol=1e-10, atol=1e-12)
    # the other per-token fields and the per-sequence view stay unweighted
    torch.testing.assert_close(got.sequence.sum, token.sum(-1), rtol=1e-10, atol=1e-12)


def test_other_calls_reach_the_forward_below():
    model = tiny_model()
    answer_fused_calls(model)
    input_ids, attention_mask, labels = batch(model.config.vocab_size, seed=4)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape[-1] == model.config.vocab_size and out.loss.isfinite()


def test_bad_temperature_named():
    with pytest.raises(ValueError, match="temperature"):
        answer_fused_calls(tiny_model(), temperature=0.0)
