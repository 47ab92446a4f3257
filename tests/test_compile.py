"""torch.compile sees lenalign's registered operators: whole graphs, eager values and
gradients, few recompilations, the same errors, and opcheck on every operator."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from helpers import BACKENDS, DEVICE
from test_errors import CASES as ERROR_CASES

from lenalign import (
    linear_sequence_logprobs,
    preference_loss,
    preference_loss_from_hidden,
    preference_loss_from_logits,
    sequence_logprobs,
)
from lenalign.losses import split_pairs

VOCAB, FEATURES = 11, 6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(pairs: int, steps: int, seed: int = 0):
    """[2B, T, V] logits, [2B, T, H] hidden states and a [V, H] head, prompts ignored."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (2 * pairs, steps), generator=generator)
    labels[:, : steps // 3] = -100
    hidden = torch.randn(2 * pairs, steps, FEATURES, generator=generator)
    weight = torch.randn(VOCAB, FEATURES, generator=generator)
    logits = torch.randn(2 * pairs, steps, VOCAB, generator=generator) * 3
    ref = torch.randn(2 * pairs, steps, VOCAB, generator=generator) * 3
    return [t.to(DEVICE) for t in (logits, labels, hidden, weight, ref)]


def _dpo_from_logits(logits, labels, ref_logits, backend):
    policy = split_pairs(sequence_logprobs(logits, labels, shift=True, backend=backend))
    with torch.no_grad():
        ref = split_pairs(sequence_logprobs(ref_logits, labels, shift=True, backend=backend))
    return preference_loss(*policy, *ref, beta=0.1, length_normalization="mean").loss


def _dpo_from_hidden(hidden, weight, labels, backend):
    logps = linear_sequence_logprobs(hidden, weight, labels, shift=True, backend=backend)
    chosen, rejected = split_pairs(logps)
    return preference_loss(chosen, rejected, loss_type="simpo", beta=2.0, gamma=0.5).loss


def _pair_loss_from_logits(logits, labels, ref_logits, backend):
    with torch.no_grad():
        ref = sequence_logprobs(ref_logits, labels, shift=True, backend=backend)
    return preference_loss_from_logits(logits, labels, None, ref, shift=True, backend=backend).loss


def _pair_loss_from_hidden(hidden, weight, labels, backend):
    return preference_loss_from_hidden(
        hidden, weight, labels, None, loss_type="simpo", shift=True, backend=backend
    ).loss


def _inputs(name, batch):
    logits, labels, hidden, weight, ref = batch
    if name in ("logits", "pair-logits"):
        return [logits.requires_grad_(), labels, ref]
    return [hidden.requires_grad_(), weight.requires_grad_(), labels]


LOSSES = {
    "logits": _dpo_from_logits,
    "hidden": _dpo_from_hidden,
    "pair-logits": _pair_loss_from_logits,
    "pair-hidden": _pair_loss_from_hidden,
}


def _loss_and_grads(fn, inputs, backend):
    loss = fn(*inputs, backend)
    differentiable = [t for t in inputs if t.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, differentiable)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_fullgraph_compile_matches_eager_without_graph_breaks(name, backend):
    fn = LOSSES[name]
    inputs = _inputs(name, _batch(2, 6))
    eager_loss, eager_grads = _loss_and_grads(fn, inputs, backend)
    compiled_loss, compiled_grads = _loss_and_grads(
        torch.compile(fn, fullgraph=True), inputs, backend
    )
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    explanation = torch._dynamo.explain(fn)(*inputs, backend)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", ["logits", "hidden"])
def test_three_shapes_compile_at_most_twice(name):
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(LOSSES[name], backend=counter)
    for seed, (pairs, steps) in enumerate([(2, 6), (3, 9), (4, 5)]):
        inputs = _inputs(name, _batch(pairs, steps, seed))
        want_loss, want_grads = _loss_and_grads(LOSSES[name], inputs, "torch")
        got_loss, got_grads = _loss_and_grads(compiled, inputs, "torch")
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(got_grads, want_grads, rtol=1e-6, atol=1e-7)
    assert counter.frame_count <= 2


def _compiled_call(*args, **kwargs):
    return sequence_logprobs(*args, **kwargs).sum


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_the_same_when_compiled(case):
    build, argument = ERROR_CASES[case]
    args, kwargs = build()
    with pytest.raises(ValueError) as eager:
        sequence_logprobs(*args, **kwargs)
    compiled = torch.compile(_compiled_call, backend="aot_eager")
    with pytest.raises(ValueError, match=rf"^{argument}: expected .+, got .+") as got:
        compiled(*args, **kwargs)
    assert str(got.value) == str(eager.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_works_under_compile(backend):
    logits, labels, *_ = _batch(1, 4)

    def fn(logits, labels, inplace_backward):
        out = sequence_logprobs(logits, labels, inplace_backward=inplace_backward, backend=backend)
        return (out.sum * torch.tensor([1.0, -2.0], device=DEVICE)).sum()

    leaf = logits.clone().requires_grad_()
    (want,) = torch.autograd.grad(fn(leaf, labels, False), leaf)
    leaf = logits.clone().requires_grad_()
    scaled = leaf * 1.0  # a non-leaf whose storage the backward may take over
    torch.compile(fn, fullgraph=True)(scaled, labels, True).backward()
    torch.testing.assert_close(leaf.grad, want, rtol=1e-6, atol=1e-7)
    # as eagerly, the gradient was written over the logits themselves
    torch.testing.assert_close(scaled.detach(), want, rtol=1e-6, atol=1e-7)


def _op_samples():
    """One call of every registered operator, on both backends, for opcheck."""
    logits, labels, hidden, weight, _ = _batch(2, 5)
    logits = logits.double()
    hidden, weight = hidden.double(), weight.double()
    bias = torch.randn(VOCAB, dtype=torch.float64, device=DEVICE)
    bounds = torch.arange(5, device=DEVICE) * 5
    targets = torch.ops.lenalign.row_targets(labels, None, bounds, -100, VOCAB, True, False)
    rows = targets.numel()
    row_max = torch.randn(rows, dtype=torch.float64, device=DEVICE)
    log_sum = torch.rand(rows, dtype=torch.float64, device=DEVICE) + 1
    coef = torch.randn(rows, dtype=torch.float64, device=DEVICE)
    mask = labels > 3
    for backend in BACKENDS:
        yield (
            torch.ops.lenalign.row_targets.default,
            (labels, mask, bounds, -100, VOCAB, True, True),
        )
        yield (
            torch.ops.lenalign.sequence_logprobs.default,
            (logits.requires_grad_(), targets, bounds, 1, False, backend == "triton", backend),
        )
        yield (
            torch.ops.lenalign.row_logprob_backward.default,
            (logits.detach(), targets, row_max, log_sum, coef, backend),
        )
        yield (
            torch.ops.lenalign.row_logprob_backward_.default,
            (logits.detach().clone(), targets, row_max, log_sum, coef, backend),
        )
        for compact in (False, True):
            yield (
                torch.ops.lenalign.linear_sequence_logprobs.default,
                (hidden.requires_grad_(), weight.requires_grad_(), bias, targets, bounds,
                 1, 4, 1.0, None, compact, compact, backend),
            )  # fmt: skip
        yield (
            torch.ops.lenalign.linear_sequence_logprobs_backward.default,
            (hidden.detach(), weight.detach(), bias, targets, row_max, log_sum, coef, 4, 2.0,
             30.0, False, list(hidden.shape), [True, True, True], backend),
        )  # fmt: skip


def test_opcheck_passes_for_every_registered_operator():
    checked = set()
    for op, args in _op_samples():
        torch.library.opcheck(op, args)
        checked.add(op.name())
    assert checked == {
        "lenalign::row_targets",
        "lenalign::sequence_logprobs",
        "lenalign::row_logprob_backward",
        "lenalign::row_logprob_backward_",
        "lenalign::linear_sequence_logprobs",
        "lenalign::linear_sequence_logprobs_backward",
    }
