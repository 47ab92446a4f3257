"""The step's loss: equal to an eager computation, through the logits or the fused head."""

from __future__ import annotations

import pytest
import torch
from hf_head_models import build_head_model
from train_helpers import small_config

from lenalign import reference_sequence_logprobs
from lenalign.integrations.hf import (
    HeadInput,
    forward_head_input,
    forward_logits,
    fused_head_transform,
)
from lenalign.losses import preference_loss, split_pairs
from lenalign.train import (
    batch_loss,
    build_tiny_llama,
    collate_pairs,
    loss_options,
    make_case_pairs,
    micro_batch_indices,
    tokenize_pairs,
    train,
)


@pytest.mark.parametrize(
    ("loss_type", "length_normalization", "extra"),
    [
        ("sigmoid", "sum", {}),
        ("ipo", "mean", {}),
        ("sigmoid", 0.5, {"label_smoothing": 0.1, "sft_weight": 0.3}),
        ("simpo", "mean", {"gamma": 0.5}),
    ],
)
def test_batch_loss_equals_eager_reference(
    tmp_path, tokenizer, loss_type, length_normalization, extra
):
    config = small_config(
        tmp_path,
        loss_type=loss_type,
        length_normalization=length_normalization,
        beta=0.7,
        **extra,
    )
    policy = build_tiny_llama(tokenizer, seed=1)
    rows = tokenize_pairs(make_case_pairs(6, seed=2), tokenizer, 64, 32)
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    reference = None
    if loss_type != "simpo":
        # a reference unlike the policy, so that the log-ratios are not all zero
        with torch.no_grad():
            ref_logits = forward_logits(build_tiny_llama(tokenizer, seed=2), batch)
        reference = split_pairs(
            reference_sequence_logprobs(
                ref_logits, batch["input_ids"], batch["completion_mask"], shift=True
            )
        )

    logits = forward_logits(policy, batch)
    fused = batch_loss(logits, batch, reference, config)
    eager_logps = reference_sequence_logprobs(
        logits, batch["input_ids"], batch["completion_mask"], shift=True
    )
    eager = preference_loss(
        *split_pairs(eager_logps), *(reference or (None, None)), **loss_options(config)
    )

    torch.testing.assert_close(fused.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.margins, eager.margins, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.chosen_lengths, eager.chosen_lengths)
    fused_grad = torch.autograd.grad(fused.loss, logits, retain_graph=True)[0]
    eager_grad = torch.autograd.grad(eager.loss, logits)[0]
    torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-4, atol=1e-7)


def test_fused_head_loss_and_gradients_equal_the_logits_path(tmp_path, tokenizer):
    config = small_config(tmp_path, length_normalization="mean", beta=0.7)
    rows = tokenize_pairs(make_case_pairs(6, seed=3), tokenizer, 64, 32)
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        ref_logits = forward_logits(build_tiny_llama(tokenizer, seed=2), batch)
    reference = split_pairs(
        reference_sequence_logprobs(
            ref_logits, batch["input_ids"], batch["completion_mask"], shift=True
        )
    )
    results = []
    for fused in (False, True):
        policy = build_tiny_llama(tokenizer, seed=1)
        outputs = forward_head_input(policy, batch) if fused else forward_logits(policy, batch)
        out = batch_loss(outputs, batch, reference, config)
        out.loss.backward()
        grads = {name: p.grad for name, p in policy.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (loss, grads), (fused_loss, fused_grads) = results
    assert loss.abs() > 1e-3
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    # the tiny model ties its head to the embeddings: one parameter, both gradients in it
    assert fused_grads.keys() == grads.keys() and "model.embed_tokens.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_head_trains_like_the_logits_path(tmp_path):
    plain = train(small_config(tmp_path / "a", max_steps=3, generate_size=0))
    fused = train(small_config(tmp_path / "b", max_steps=3, generate_size=0, fused_head=True))
    for a, b in zip(plain.train_log, fused.train_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert fused.eval_log[0]["loss"] == pytest.approx(plain.eval_log[0]["loss"], rel=1e-4)


# a family per head transform fused_head_transform maps (tests/hf_head_models.py)
HEAD_KINDS = ["gemma2", "cohere", "granite", "hyperclovax", "falcon_h1", "muse_glimmer"]


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_fused_head_reproduces_scaled_and_capped_logits(tmp_path, tokenizer, kind):
    config = small_config(tmp_path, loss_type="simpo", length_normalization="mean", beta=2.0)
    rows = tokenize_pairs(make_case_pairs(4, seed=5), tokenizer, 48, 24)
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    results = []
    for fused in (False, True):
        model = build_head_model(kind, len(tokenizer), seed=3).double()
        outputs = forward_head_input(model, batch) if fused else forward_logits(model, batch)
        out = batch_loss(outputs, batch, None, config)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads, outputs))
    (loss, grads, _), (fused_loss, fused_grads, head_input) = results
    # the transform matters here: without it the loss would differ
    assert head_input.transform != {"logit_scale": 1.0, "logit_softcap": None}
    plain = batch_loss(
        HeadInput(head_input.hidden, head_input.weight, head_input.bias, {}), batch, None, config
    )
    assert abs(float(plain.loss.detach()) - float(loss)) > 1e-3
    torch.testing.assert_close(fused_loss, loss, rtol=1e-10, atol=1e-12)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["granite", "muse_glimmer"])
def test_fused_head_trains_a_scaled_head_like_the_logits_path(tmp_path, tokenizer, kind):
    # two of the transforms the trainer refused before: logits_scaling (a division), and
    # output_multiplier before a cap (lm_head_multiplier is checked per batch above)
    runs = []
    for fused in (False, True):
        config = small_config(
            tmp_path / str(fused),
            **{"synthetic_size": 64, "batch_size": 4, "max_steps": 2, "warmup_steps": 1},
            **{"eval_size": 8, "generate_size": 0, "fused_head": fused},
        )
        model = build_head_model(kind, len(tokenizer), seed=4)
        runs.append(train(config, model=model, tokenizer=tokenizer))
    plain, fused = runs
    for a, b in zip(plain.train_log, fused.train_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert fused.eval_log[0]["loss"] == pytest.approx(plain.eval_log[0]["loss"], rel=1e-4)


def test_fused_head_refuses_a_head_it_cannot_form_before_any_step(tmp_path, tokenizer):
    model = build_tiny_llama(tokenizer, seed=0)
    assert fused_head_transform(model) == {"logit_scale": 1.0, "logit_softcap": None}
    model.lm_head = torch.nn.Identity()
    config = small_config(tmp_path, fused_head=True)
    with pytest.raises(ValueError, match=r"^fused_head: expected .*nn.Linear, got Identity"):
        train(config, model=model, tokenizer=tokenizer)
    assert not (tmp_path / "run").exists()


def test_trainer_first_step_logs_the_independently_computed_loss(tmp_path, tokenizer):
    config = small_config(tmp_path, max_steps=1, eval_size=0)
    result = train(config)

    pairs = make_case_pairs(config.synthetic_size, config.seed)
    indices = micro_batch_indices(len(pairs), config.batch_size, config.seed, number=0)
    rows = tokenize_pairs(
        [pairs[i] for i in indices], tokenizer, config.max_length, config.max_prompt_length
    )
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    policy = build_tiny_llama(tokenizer, config.seed)
    reference = build_tiny_llama(tokenizer, config.seed)
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels, mask = batch["input_ids"], batch["completion_mask"]
    policy_logps = reference_sequence_logprobs(logits.logits, labels, mask, shift=True)
    ref_logps = reference_sequence_logprobs(ref_logits.logits, labels, mask, shift=True)
    expected = preference_loss(*split_pairs(policy_logps), *split_pairs(ref_logps), beta=0.1)

    (record,) = result.train_log
    assert record["loss"] == pytest.approx(float(expected.loss), rel=1e-5)
    assert record["chosen_length"] == pytest.approx(float(expected.chosen_lengths.float().mean()))
