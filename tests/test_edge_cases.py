"""Edge cases of shape, layout, content and determinism, for both backends."""

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

import lenalign.torch_backend
from lenalign import sequence_logprobs
from lenalign.layout import build_layout


def _outputs_and_grad(logits, labels, mask=None, backend="torch", **options):
    """(sum, mean, count, token_logprobs, grad) for a fixed nonzero upstream gradient."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = sequence_logprobs(
        leaf, labels, mask, return_token_logprobs=True, backend=backend, **options
    )
    weights = upstream_gradients(len(out.sum), out.token_logprobs.shape)
    weighted_objective(out.sum, out.mean, out.token_logprobs, weights).backward()
    return out.sum, out.mean, out.count, out.token_logprobs, leaf.grad


def _truth_and_grad(logits, labels, mask=None, **options):
    leaf = logits.detach().double().requires_grad_(True)
    seq_sum, seq_mean, seq_count, tokens = naive_sequence_logprobs(leaf, labels, mask, **options)
    weights = upstream_gradients(len(seq_sum), tokens.shape)
    objective = weighted_objective(seq_sum, seq_mean, tokens, weights)
    if not objective.requires_grad:  # nothing counted: no path from the logits at all
        return seq_sum, seq_mean, seq_count, tokens, torch.zeros_like(leaf)
    objective.backward()
    return seq_sum, seq_mean, seq_count, tokens, leaf.grad


def _assert_matches_truth(logits, labels, mask=None, backend="torch", tol=1e-12, **options):
    ours = _outputs_and_grad(logits, labels, mask, backend, **options)
    truth = _truth_and_grad(logits, labels, mask, **options)
    for got, expected in zip(ours, truth, strict=True):
        if got.dtype == torch.int64:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 2, 7, 37, 5000])
def test_vocab_sizes(backend, vocab):
    # 5000 in float64 spans three 2048-element blocks; 7 and 37 are not powers of two
    logits, labels, mask = random_problem(2, 3, vocab, seed=vocab)
    ours = _assert_matches_truth(logits, labels, mask, backend, shift=True)
    if vocab == 1:
        assert bool((ours[3] == 0).all()), "log p = 0 when there is one token"


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_step_sequences(backend):
    logits, labels, _ = random_problem(3, 1, 5, seed=2, ignored_fraction=0.0)
    count = _assert_matches_truth(logits, labels, None, backend)[2]
    assert bool((count == 1).all())
    # with shift a one-step sequence has nothing to score: mean is exactly 0, no gradient
    _, seq_mean, count, _, grad = _assert_matches_truth(logits, labels, None, backend, shift=True)
    assert bool((count == 0).all()) and bool((seq_mean == 0).all())
    assert bool((grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_without_counted_tokens(backend):
    logits, labels, mask = random_problem(3, 4, 6, seed=5, ignored_fraction=0.0)
    mask[1] = False
    seq_sum, seq_mean, count, _, grad = _assert_matches_truth(logits, labels, mask, backend)
    assert int(count[1]) == 0 and float(seq_mean[1].detach()) == 0.0
    assert float(seq_sum[1].detach()) == 0.0
    assert bool((grad[1] == 0).all())
    assert bool((grad[0] != 0).any()) and bool((grad[2] != 0).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_token_masked(backend):
    logits, labels, _ = random_problem(2, 3, 5, seed=6)
    labels[:] = -100
    seq_sum, seq_mean, count, tokens, grad = _outputs_and_grad(logits, labels, None, backend)
    for value in (seq_sum, seq_mean, count, tokens, grad):
        assert bool((value == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logits = torch.randn(0, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, 4, dtype=torch.int64, device=DEVICE)
    out = sequence_logprobs(logits, labels, backend=backend)
    assert out.sum.shape == (0,) and out.count.shape == (0,)
    out.sum.sum().backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_view_is_not_copied_and_matches(backend):
    logits, labels, mask = random_problem(2, 6, 9, seed=8)
    view = logits[:, :-1]
    layout = build_layout(view, labels[:, 1:], None, -100, False, None)
    assert layout.rows3d.data_ptr() == view.data_ptr()
    assert layout.rows3d.stride() == view.stride()
    _assert_matches_truth(view, labels[:, 1:], mask[:, 1:], backend)
    # shift=True on the full logits scores the same positions as the sliced view
    shifted = _outputs_and_grad(logits, labels, mask, backend, shift=True)
    sliced = _outputs_and_grad(view.contiguous(), labels[:, 1:], mask[:, 1:], backend)
    torch.testing.assert_close(shifted[0], sliced[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shifted[2], sliced[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_and_strided_layouts(backend):
    logits, labels, mask = random_problem(3, 4, 6, seed=9)
    time_major = logits.transpose(0, 1).contiguous().transpose(0, 1)  # [B, T, V], T-major storage
    assert not time_major.is_contiguous()
    _assert_matches_truth(time_major, labels, mask, backend, shift=True)
    vocab_strided = logits.transpose(1, 2).contiguous().transpose(1, 2)  # vocab stride != 1
    assert vocab_strided.stride(-1) != 1
    _assert_matches_truth(vocab_strided, labels, mask, backend, shift=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_mask_and_int32_labels(backend):
    logits, labels, mask = random_problem(2, 5, 7, seed=10)
    ours = _outputs_and_grad(logits, labels.to(torch.int32), mask.to(torch.uint8), backend)
    expected = _outputs_and_grad(logits, labels, mask, backend)
    for got, want in zip(ours, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_and_packed_layouts_agree(backend):
    logits, labels, mask = random_problem(3, 5, 8, seed=12)
    padded = _outputs_and_grad(logits, labels, mask, backend, shift=True)
    cu_seqlens = torch.tensor([0, 5, 10, 15], device=DEVICE)
    packed = _outputs_and_grad(
        logits.reshape(15, 8),
        labels.reshape(15),
        mask.reshape(15),
        backend,
        shift=True,
        cu_seqlens=cu_seqlens,
    )
    for got, want in zip(packed, padded, strict=True):
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_runs_are_bitwise_equal(backend, dtype):
    logits, labels, mask = random_problem(3, 7, 40, dtype=dtype, seed=13)
    first = _outputs_and_grad(logits, labels, mask, backend, shift=True)
    second = _outputs_and_grad(logits, labels, mask, backend, shift=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_off_the_label(backend):
    # a whole leading block of -inf (vocab blocks are 2048 wide in float64), then more -inf;
    # every label lies past them
    vocab = 4100
    logits, labels, mask = random_problem(2, 3, vocab, seed=14, ignored_fraction=0.0)
    logits[..., :2500] = float("-inf")
    logits[0, 1, 3000:3100] = float("-inf")
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(3100, vocab, labels.shape, generator=generator).to(DEVICE)
    ours = _assert_matches_truth(logits, labels, mask, backend)
    assert bool(torch.isfinite(ours[0]).all()) and bool(torch.isfinite(ours[4]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_large_magnitude_logits_stay_accurate(backend, dtype):
    logits, labels, mask = random_problem(2, 4, 50, seed=15, scale=1.0)
    logits = (logits + 1e4).to(dtype)  # every logit near 1e4: exp overflows without the max
    ours = _outputs_and_grad(logits, labels, mask, backend)
    truth = _truth_and_grad(logits, labels, mask)
    assert all(bool(torch.isfinite(v.double()).all()) for v in ours)
    # values within fp32 rounding of the (small) log-probabilities, not of the 1e4 logits
    torch.testing.assert_close(ours[0].double(), truth[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours[4].double(), truth[4], rtol=0, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_poison_only_their_sequence(backend):
    logits, labels, _ = random_problem(3, 4, 6, seed=16, ignored_fraction=0.0, masked_fraction=0.0)
    clean = _outputs_and_grad(logits, labels, None, backend)
    poisoned = logits.clone()
    poisoned[1, 2, 3] = float("nan")
    poisoned[2, 0, 1] = float("inf")
    seq_sum, seq_mean, _, _, grad = _outputs_and_grad(poisoned, labels, None, backend)
    assert bool(torch.isnan(seq_sum[1])) and bool(torch.isnan(seq_mean[1]))
    assert not bool(torch.isfinite(seq_sum[2]))
    assert torch.equal(seq_sum[0], clean[0][0]) and torch.equal(grad[0], clean[4][0])
    assert bool(torch.isnan(grad[1, 2]).all())
    # a nan in a row that is never counted is never read
    labels_ignoring = labels.clone()
    labels_ignoring[1, 2] = -100
    unread = _outputs_and_grad(poisoned[:2], labels_ignoring[:2], None, backend)
    reference = _outputs_and_grad(logits[:2], labels_ignoring[:2], None, backend)
    assert torch.equal(unread[0], reference[0])
    assert torch.equal(unread[4][0], reference[4][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_without_grad(backend):
    logits, labels, mask = random_problem(2, 3, 5, seed=17)
    with torch.no_grad():
        out = sequence_logprobs(logits, labels, mask, backend=backend)
    assert out.sum.grad_fn is None
    assert out.token_logprobs is None
    torch.testing.assert_close(out.sum, naive_sequence_logprobs(logits, labels, mask)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_one_output_only(backend):
    logits, labels, mask = random_problem(2, 5, 6, seed=18)
    leaf = logits.clone().requires_grad_(True)
    sequence_logprobs(leaf, labels, mask, backend=backend).mean.sum().backward()
    truth_leaf = logits.clone().requires_grad_(True)
    naive_sequence_logprobs(truth_leaf, labels, mask)[1].sum().backward()
    torch.testing.assert_close(leaf.grad, truth_leaf.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_the_gradient_into_the_logits(backend):
    logits, labels, mask = random_problem(2, 5, 6, seed=19)
    expected = _outputs_and_grad(logits, labels, mask, backend, shift=True)[4]
    leaf = logits.clone().requires_grad_(True)
    hidden = leaf * 1.0  # a non-leaf, like a model head's output
    out = sequence_logprobs(
        hidden,
        labels,
        mask,
        shift=True,
        inplace_backward=True,
        return_token_logprobs=True,
        backend=backend,
    )
    weights = upstream_gradients(2, labels.shape)
    weighted_objective(out.sum, out.mean, out.token_logprobs, weights).backward()
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_to_corrupt_another_use_of_the_logits(backend):
    logits, labels, _ = random_problem(2, 3, 4, seed=20)
    leaf = logits.clone().requires_grad_(True)
    hidden = leaf.exp()  # exp saves its output for its own backward
    out = sequence_logprobs(hidden, labels, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum.sum().backward()


@pytest.mark.parametrize("chunk_elements", [1, 14, 30])
def test_torch_backend_chunks_agree_with_truth(monkeypatch, chunk_elements):
    # runs of counted rows cut into chunks of one, two and four rows of 7 logits
    logits, labels, mask = random_problem(3, 9, 7, seed=21, masked_fraction=0.1)
    whole_bf16 = _outputs_and_grad(logits.to(torch.bfloat16), labels, mask, "torch")
    monkeypatch.setattr(lenalign.torch_backend, "CHUNK_ELEMENTS", chunk_elements)
    _assert_matches_truth(logits, labels, mask, "torch", shift=True)
    # 16-bit logits take the chunk-buffer path of the backward
    chunked_bf16 = _outputs_and_grad(logits.to(torch.bfloat16), labels, mask, "torch")
    for got, want in zip(chunked_bf16, whole_bf16, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
