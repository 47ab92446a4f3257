"""Float64 correctness of both backends: values against an independent position-by-position
ground truth, and torch.autograd.gradcheck through sum, mean and token_logprobs at once."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BACKENDS,
    DEVICE,
    naive_sequence_logprobs,
    random_problem,
    upstream_gradients,
    weighted_objective,
)

from lenalign import sequence_logprobs

# (name, batch, steps, vocab, shift, packed boundaries or None)
CASES = [
    ("padded", 2, 5, 7, False, None),
    ("padded-shift", 2, 5, 7, True, None),
    ("packed", 1, 9, 6, False, [0, 4, 4, 9]),
    ("packed-shift", 1, 9, 6, True, [0, 3, 3, 5, 9]),
]


def _run(logits, labels, mask, shift, cu_seqlens, backend):
    return sequence_logprobs(
        logits if cu_seqlens is None else logits.reshape(-1, logits.shape[-1]),
        labels if cu_seqlens is None else labels.reshape(-1),
        mask if cu_seqlens is None else mask.reshape(-1),
        shift=shift,
        cu_seqlens=cu_seqlens,
        return_token_logprobs=True,
        backend=backend,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "batch", "steps", "vocab", "shift", "bounds"), CASES)
def test_values_and_gradients_match_ground_truth(name, batch, steps, vocab, shift, bounds, backend):
    logits, labels, mask = random_problem(batch, steps, vocab, seed=len(name))
    cu_seqlens = None if bounds is None else torch.tensor(bounds, device=DEVICE)
    logits.requires_grad_(True)
    out = _run(logits, labels, mask, shift, cu_seqlens, backend)
    truth_logits = logits.detach().clone().requires_grad_(True)
    truth = naive_sequence_logprobs(
        truth_logits if cu_seqlens is None else truth_logits.reshape(-1, vocab),
        labels if cu_seqlens is None else labels.reshape(-1),
        mask if cu_seqlens is None else mask.reshape(-1),
        shift=shift,
        cu_seqlens=cu_seqlens,
    )
    assert out.sum.dtype == torch.float64
    assert out.count.dtype == torch.int64
    torch.testing.assert_close(out.sum, truth[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mean, truth[1], rtol=1e-12, atol=1e-12)
    assert torch.equal(out.count, truth[2])
    torch.testing.assert_close(out.token_logprobs, truth[3], rtol=1e-12, atol=1e-12)
    assert int(out.count.sum()) > 0, "the case must count some positions"

    weights = upstream_gradients(len(out.sum), out.token_logprobs.shape)
    weighted_objective(out.sum, out.mean, out.token_logprobs, weights).backward()
    weighted_objective(truth[0], truth[1], truth[3], weights).backward()
    torch.testing.assert_close(logits.grad, truth_logits.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "batch", "steps", "vocab", "shift", "bounds"), CASES)
def test_gradcheck_float64(name, batch, steps, vocab, shift, bounds, backend):
    logits, labels, mask = random_problem(batch, steps, vocab, seed=7 + len(name))
    cu_seqlens = None if bounds is None else torch.tensor(bounds, device=DEVICE)
    logits.requires_grad_(True)

    def differentiable_outputs(x):
        out = _run(x, labels, mask, shift, cu_seqlens, backend)
        return out.sum, out.mean, out.token_logprobs

    assert torch.autograd.gradcheck(differentiable_outputs, (logits,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_packed_3d_layout(backend):
    logits, labels, mask = random_problem(1, 8, 5, seed=3)
    cu_seqlens = torch.tensor([0, 5, 8], dtype=torch.int32, device=DEVICE)
    logits.requires_grad_(True)

    def differentiable_outputs(x):
        out = sequence_logprobs(
            x,
            labels,
            mask,
            shift=True,
            cu_seqlens=cu_seqlens,
            return_token_logprobs=True,
            backend=backend,
        )
        return out.sum, out.mean, out.token_logprobs

    assert torch.autograd.gradcheck(differentiable_outputs, (logits,), eps=1e-6, atol=1e-8)
