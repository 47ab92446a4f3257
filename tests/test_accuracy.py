"""Low-precision accuracy: against a float64 ground truth on the same (already rounded)
logits, each backend's error must be no larger than eager PyTorch's error in the same
dtype, plus a small tolerance. Eager PyTorch here is ``reference_sequence_logprobs``:
the fp32 log_softmax that trainers run today."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE, random_problem, upstream_gradients, weighted_objective

from lenalign import reference_sequence_logprobs, sequence_logprobs

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _values_and_grad(compute, logits, weights):
    logits = logits.detach().clone().requires_grad_(True)
    out = compute(logits)
    weighted_objective(out.sum, out.mean, out.token_logprobs, weights).backward()
    values = torch.cat(
        [out.sum.double(), out.mean.double(), out.token_logprobs.double().flatten()]
    ).detach()
    return values, logits.grad.double()


def _max_error(approx: torch.Tensor, truth: torch.Tensor) -> float:
    return float((approx - truth).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shift", [False, True])
def test_error_no_larger_than_eager(backend, dtype, shift):
    # V = 300 spans several vocab blocks for 16-bit dtypes under the interpreter's sizes
    logits, labels, mask = random_problem(3, 6, 300, dtype=dtype, seed=11, scale=4.0)
    weights = upstream_gradients(3, labels.shape)
    options = {"shift": shift}

    # an fp64 leaf of its own, so that the true gradient is not rounded to ``dtype``
    truth_values, truth_grad = _values_and_grad(
        lambda x: reference_sequence_logprobs(x, labels, mask, **options),
        logits.double(),
        weights,
    )
    eager_values, eager_grad = _values_and_grad(
        lambda x: reference_sequence_logprobs(x, labels, mask, **options), logits, weights
    )
    ours_values, ours_grad = _values_and_grad(
        lambda x: sequence_logprobs(
            x, labels, mask, return_token_logprobs=True, backend=backend, **options
        ),
        logits,
        weights,
    )
    assert ours_grad.dtype == eager_grad.dtype
    # small tolerances: fp32 accumulation noise for values, one unit in the last place of
    # the largest gradient entry for the single rounding to the logits' dtype (Triton's
    # interpreter rounds fp32 -> bf16 toward zero, where compiled kernels round to nearest)
    value_tolerance = 1e-5 * float(truth_values.abs().max())
    grad_tolerance = torch.finfo(dtype).eps * float(truth_grad.abs().max())
    assert _max_error(ours_values, truth_values) <= (
        _max_error(eager_values, truth_values) + value_tolerance
    )
    assert _max_error(ours_grad, truth_grad) <= _max_error(eager_grad, truth_grad) + grad_tolerance


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_label_gradient_survives_confident_rows(backend):
    # p[y] = 1 - 3.9e-4 rounds to exactly 1 in bf16: forming 1 - p[y] after rounding would
    # give a zero gradient on the label; it must be formed in fp32 and rounded once
    vocab = 64
    logits = torch.zeros(1, 3, vocab, device=DEVICE)
    logits += torch.linspace(-0.5, 0.5, vocab, device=DEVICE)
    labels = torch.tensor([[5, 9, 17]], device=DEVICE)
    logits[0, torch.arange(3), labels[0]] += 12.0
    logits = logits.to(torch.bfloat16).requires_grad_(True)
    sequence_logprobs(logits, labels, backend=backend).sum.sum().backward()
    truth_logits = logits.detach().double().requires_grad_(True)
    reference_sequence_logprobs(truth_logits, labels).sum.sum().backward()
    label_grad = logits.grad[0, torch.arange(3), labels[0]].double()
    truth_label_grad = truth_logits.grad[0, torch.arange(3), labels[0]]
    assert bool((truth_label_grad > 1e-4).all())
    torch.testing.assert_close(label_grad, truth_label_grad, rtol=2**-7, atol=0.0)
