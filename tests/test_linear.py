"""``linear_sequence_logprobs``: hidden states through the LM head, chunk by chunk.

Its truth is the position-by-position float64 ground truth of helpers.py applied to the
logits ``hidden @ weight.T + bias`` formed in float64; gradcheck runs through the
hidden states, the weight and the bias at once, over several chunks; low precision is
held to eager PyTorch's error (the full bf16 logits of ``F.linear``, then an fp32
log_softmax) against that truth.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BACKENDS,
    DEVICE,
    naive_sequence_logprobs,
    upstream_gradients,
    weighted_objective,
)

from lenalign import linear_sequence_logprobs, reference_sequence_logprobs

# (name, batch, steps, features, vocab, shift, packed boundaries or None)
CASES = [
    ("padded", 2, 5, 4, 7, False, None),
    ("padded-shift", 2, 5, 4, 7, True, None),
    ("packed-shift", 1, 9, 3, 6, True, [0, 3, 3, 5, 9]),
]


def head_problem(batch, steps, features, vocab, *, dtype=torch.float64, seed=0, bias=True):
    """Hidden states, head weight and bias, labels with ignore_index, and a mask."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, steps, features, generator=generator)
    weight = torch.randn(vocab, features, generator=generator) * 1.5
    head_bias = torch.randn(vocab, generator=generator) if bias else None
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    labels[torch.rand(batch, steps, generator=generator) < 0.2] = -100
    mask = torch.rand(batch, steps, generator=generator) >= 0.3

    def place(tensor):
        return None if tensor is None else tensor.to(dtype=dtype, device=DEVICE)

    return place(hidden), place(weight), place(head_bias), labels.to(DEVICE), mask.to(DEVICE)


def transformed(logits, scale, softcap):
    """The head transforms as the models write them (Cohere's scale, Gemma 2's soft cap)."""
    logits = logits * scale
    return softcap * torch.tanh(logits / softcap) if softcap is not None else logits


def _flatten(tensor, packed):
    return tensor.reshape(-1, *tensor.shape[2:]) if packed else tensor


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "batch", "steps", "features", "vocab", "shift", "bounds"), CASES)
def test_matches_ground_truth_and_gradchecks(
    name, batch, steps, features, vocab, shift, bounds, backend
):
    hidden, weight, head_bias, labels, mask = head_problem(
        batch, steps, features, vocab, seed=len(name)
    )
    packed = bounds is not None
    cu_seqlens = torch.tensor(bounds, device=DEVICE) if packed else None
    weights = upstream_gradients(
        len(bounds) - 1 if packed else batch, _flatten(labels, packed).shape
    )

    def ours(h, w, b):
        out = linear_sequence_logprobs(
            _flatten(h, packed),
            w,
            _flatten(labels, packed),
            _flatten(mask, packed),
            bias=b,
            shift=shift,
            cu_seqlens=cu_seqlens,
            return_token_logprobs=True,
            chunk_rows=2,  # several chunks: the weight's gradient is summed over them
            backend=backend,
        )
        return out

    def truth(h, w, b):
        logits = torch.nn.functional.linear(h, w, b)
        return naive_sequence_logprobs(
            _flatten(logits, packed),
            _flatten(labels, packed),
            _flatten(mask, packed),
            shift=shift,
            cu_seqlens=cu_seqlens,
        )

    out = ours(hidden, weight, head_bias)
    want = truth(hidden, weight, head_bias)
    torch.testing.assert_close(out.sum, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mean, want[1], rtol=1e-12, atol=1e-12)
    assert torch.equal(out.count, want[2])
    torch.testing.assert_close(out.token_logprobs, want[3], rtol=1e-12, atol=1e-12)

    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, head_bias)]

    def objective(h, w, b):
        result = ours(h, w, b)
        return weighted_objective(result.sum, result.mean, result.token_logprobs, weights)

    assert torch.autograd.gradcheck(objective, tuple(leaves), eps=1e-6, atol=1e-8)
    # and the gradients equal the truth's, not only each other's finite differences
    objective(*leaves).backward()
    truth_leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, head_bias)]
    want = truth(*truth_leaves)
    weighted_objective(want[0], want[1], want[3], weights).backward()
    for got, expected in zip(leaves, truth_leaves, strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_does_not_change_the_result(backend):
    hidden, weight, head_bias, labels, mask = head_problem(3, 7, 5, 11, seed=3)
    results = []
    for chunk_rows in (1, 4, None):
        leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, head_bias)]
        out = linear_sequence_logprobs(
            leaves[0], leaves[1], labels, mask, bias=leaves[2], shift=True,
            chunk_rows=chunk_rows, backend=backend,
        )  # fmt: skip
        (out.sum * 0.7 + out.mean * 1.3).sum().backward()
        results.append([out.sum, out.mean] + [leaf.grad for leaf in leaves])
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_rows", [3, None], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize(("scale", "softcap"), [(1.0, None), (1.5, 4.0)], ids=["plain", "capped"])
def test_error_no_larger_than_eager(backend, dtype, chunk_rows, scale, softcap):
    hidden, weight, head_bias, labels, mask = head_problem(3, 6, 16, 300, dtype=dtype, seed=5)
    weights = upstream_gradients(3, labels.shape)

    def run(compute, h, w, b):
        leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
        out = compute(*leaves)
        weighted_objective(out.sum, out.mean, out.token_logprobs, weights).backward()
        values = torch.cat([out.sum.double(), out.mean.double(), out.token_logprobs.flatten()])
        return [values.double().detach()] + [leaf.grad.double() for leaf in leaves]

    def eager(h, w, b):
        logits = transformed(torch.nn.functional.linear(h, w, b), scale, softcap)
        return reference_sequence_logprobs(logits, labels, mask, shift=True)

    def ours(h, w, b):
        return linear_sequence_logprobs(
            h, w, labels, mask, bias=b, shift=True, return_token_logprobs=True,
            chunk_rows=chunk_rows, logit_scale=scale, logit_softcap=softcap, backend=backend,
        )  # fmt: skip

    # truth: the same rounded inputs, every operation in float64
    truth = run(eager, hidden.double(), weight.double(), head_bias.double())
    eager_results = run(eager, hidden, weight, head_bias)
    ours_results = run(ours, hidden, weight, head_bias)
    names = ("values", "hidden grad", "weight grad", "bias grad")
    for name, got, base, want in zip(names, ours_results, eager_results, truth, strict=True):
        ours_error = float((got - want).abs().max())
        eager_error = float((base - want).abs().max())
        # one unit in the last place of the largest entry: the single rounding to dtype
        # (Triton's interpreter rounds toward zero where compiled kernels round to nearest)
        tolerance = torch.finfo(dtype).eps * float(want.abs().max())
        assert ours_error <= eager_error + tolerance, (name, ours_error, eager_error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_or_frozen_hidden(backend):
    hidden, weight, head_bias, labels, mask = head_problem(2, 5, 4, 9, seed=6)
    hidden.requires_grad_(True)
    out = linear_sequence_logprobs(hidden, weight, labels, mask, bias=head_bias, backend=backend)
    out.sum.sum().backward()
    assert hidden.grad is not None and weight.grad is None and head_bias.grad is None
    hidden.requires_grad_(False)
    weight.requires_grad_(True)
    out = linear_sequence_logprobs(hidden, weight, labels, mask, backend=backend)
    out.mean.sum().backward()
    assert weight.grad is not None and hidden.grad is not None  # from the first call only
    assert float(weight.grad.abs().max()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncounted_rows_get_zero_gradient_and_nothing_counted_is_zero(backend):
    hidden, weight, _, labels, mask = head_problem(2, 6, 4, 9, seed=7, bias=False)
    mask[1] = False  # the second sequence counts nothing
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = linear_sequence_logprobs(hidden, weight, labels, mask, backend=backend)
    assert out.count[1] == 0 and out.sum[1] == 0 and out.mean[1] == 0
    out.sum.sum().backward()
    counted = (labels != -100) & mask
    assert torch.all(hidden.grad[~counted] == 0)
    assert torch.all(hidden.grad[counted].abs().sum(-1) > 0)

    nothing = torch.zeros_like(mask)
    weight.grad = None
    out = linear_sequence_logprobs(hidden, weight, labels, nothing, backend=backend)
    assert torch.all(out.sum == 0) and torch.all(out.count == 0)
    out.mean.sum().backward()
    assert torch.all(weight.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_hidden_state_poisons_only_its_sequence(backend):
    hidden, weight, head_bias, labels, _ = head_problem(2, 4, 3, 5, seed=8)
    labels[:] = 1
    hidden[0, 2, 1] = float("nan")
    out = linear_sequence_logprobs(hidden, weight, labels, bias=head_bias, backend=backend)
    assert torch.isnan(out.sum[0]) and torch.isfinite(out.sum[1])


def test_packed_three_dimensional_and_two_dimensional_agree():
    hidden, weight, head_bias, labels, mask = head_problem(1, 8, 4, 6, seed=9)
    cu_seqlens = torch.tensor([0, 3, 8], device=DEVICE)
    flat = linear_sequence_logprobs(
        hidden[0], weight, labels[0], mask[0], bias=head_bias, shift=True, cu_seqlens=cu_seqlens
    )
    batched = linear_sequence_logprobs(
        hidden, weight, labels, mask, bias=head_bias, shift=True, cu_seqlens=cu_seqlens
    )
    torch.testing.assert_close(flat.sum, batched.sum, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (lambda a: {**a, "weight": a["weight"][:, :-1]}, "weight"),
        (lambda a: {**a, "weight": a["weight"].float()}, "weight"),
        (lambda a: {**a, "weight": a["weight"][0]}, "weight"),
        (lambda a: {**a, "bias": a["bias"][:-1]}, "bias"),
        (lambda a: {**a, "bias": a["bias"].float()}, "bias"),
        (lambda a: {**a, "hidden": a["hidden"].long()}, "hidden"),
        (lambda a: {**a, "hidden": a["hidden"][0]}, "hidden"),
        (lambda a: {**a, "labels": a["labels"][:, :-1]}, "labels"),
        (lambda a: {**a, "chunk_rows": 0}, "chunk_rows"),
        (lambda a: {**a, "chunk_rows": 2.0}, "chunk_rows"),
        (lambda a: {**a, "return_token_logprobs": 1}, "return_token_logprobs"),
    ],
)
def test_bad_arguments_name_themselves(change, argument):
    hidden, weight, head_bias, labels, mask = head_problem(2, 5, 4, 9, seed=10)
    arguments = {
        "hidden": hidden,
        "weight": weight,
        "labels": labels,
        "mask": mask,
        "bias": head_bias,
    }
    with pytest.raises(ValueError, match=rf"^{argument}: expected .+, got .+"):
        linear_sequence_logprobs(**change(arguments))


def test_label_shape_error_points_at_the_hidden_states():
    hidden, weight, _, labels, _ = head_problem(2, 5, 4, 9, seed=11)
    with pytest.raises(ValueError, match=r"hidden\.shape\[:-1\]"):
        linear_sequence_logprobs(hidden, weight, labels[:, :-1])


def test_label_outside_the_heads_vocabulary_is_refused():
    hidden, weight, _, labels, _ = head_problem(2, 5, 4, 9, seed=12)
    labels[1, 3] = 9
    with pytest.raises(ValueError, match=r"labels: .*\[0, 9\).* got 9 at position \(1, 3\)"):
        linear_sequence_logprobs(hidden, weight, labels)


def test_autocast_does_not_change_the_head():
    # the logits are formed in the inputs' dtype, forward and recomputed backward alike
    hidden, weight, head_bias, labels, mask = head_problem(
        2, 6, 8, 40, dtype=torch.float32, seed=13
    )
    results = []
    for autocast in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, head_bias)]
        # backward inside the autocast region too: its matmuls must not drop to bf16 either
        with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            out = linear_sequence_logprobs(
                leaves[0], leaves[1], labels, mask, bias=leaves[2], chunk_rows=3
            )
            out.mean.sum().backward()
        results.append([out.sum] + [leaf.grad for leaf in leaves])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_view_and_empty_batch(backend):
    generator = torch.Generator().manual_seed(14)
    weight = torch.randn(7, 4, generator=generator, dtype=torch.float64).to(DEVICE)
    base = torch.randn(2, 6, 8, generator=generator, dtype=torch.float64).to(DEVICE)
    labels = torch.randint(0, 7, (2, 3), generator=generator).to(DEVICE)
    grads = []
    for through_head in (True, False):
        leaf = base.clone().requires_grad_(True)
        view = leaf[:, ::2, ::2]  # [2, 3, 4], no unit stride anywhere but the last
        if through_head:
            out = linear_sequence_logprobs(view, weight, labels, shift=True, backend=backend)
        else:
            logits = torch.nn.functional.linear(view, weight)
            out = reference_sequence_logprobs(logits, labels, shift=True)
        out.mean.sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)

    empty = torch.zeros(0, 5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = linear_sequence_logprobs(
        empty, weight, torch.zeros(0, 5, dtype=torch.int64, device=DEVICE), backend=backend
    )
    assert out.sum.shape == (0,)
    out.sum.sum().backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("scale", "softcap"), [(0.7, None), (1.0, 2.5), (1.3, 3.0)])
def test_scaled_and_capped_head_matches_truth_and_gradchecks(backend, scale, softcap):
    hidden, weight, head_bias, labels, mask = head_problem(2, 6, 4, 9, seed=15)
    weights = upstream_gradients(2, labels.shape)
    options = {"logit_scale": scale, "logit_softcap": softcap}

    def ours(h, w, b):
        out = linear_sequence_logprobs(
            h, w, labels, mask, bias=b, shift=True, return_token_logprobs=True,
            chunk_rows=3, backend=backend, **options,
        )  # fmt: skip
        return weighted_objective(out.sum, out.mean, out.token_logprobs, weights)

    def truth(h, w, b):
        logits = transformed(torch.nn.functional.linear(h, w, b), scale, softcap)
        want = naive_sequence_logprobs(logits, labels, mask, shift=True)
        return weighted_objective(want[0], want[1], want[3], weights)

    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, head_bias)]
    truth_leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, head_bias)]
    got, want = ours(*leaves), truth(*truth_leaves)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.backward()
    want.backward()
    for leaf, expected in zip(leaves, truth_leaves, strict=True):
        torch.testing.assert_close(leaf.grad, expected.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(ours, tuple(leaves), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("logit_scale", 0.0),
        ("logit_scale", -1.0),
        ("logit_scale", float("nan")),
        ("logit_scale", "1"),
        ("logit_softcap", 0.0),
        ("logit_softcap", float("inf")),
        ("logit_softcap", True),
    ],
)
def test_bad_transform_is_refused(argument, value):
    hidden, weight, _, labels, _ = head_problem(2, 5, 4, 9, seed=17)
    with pytest.raises(ValueError, match=rf"^{argument}: expected a finite number > 0"):
        linear_sequence_logprobs(hidden, weight, labels, **{argument: value})
