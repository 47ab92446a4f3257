"""Per-token statistics (entropy, mean logit, top-1, log sum p**2) from the forward pass:
float64 truth on both backends and both entries, low precision against eager's error,
non-finite rows, no gradient, and a compiled graph."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE, random_problem

from lenalign import TokenStats, linear_sequence_logprobs, sequence_logprobs
from lenalign.losses import split_pairs


def naive_token_stats(logits: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor):
    """TokenStats written from their definitions in float64, position by position
    (``counted`` says which positions count; the others are 0 / False)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).double()
    flat_labels, flat_counted = labels.reshape(-1), counted.reshape(-1)
    fields = [[], [], [], []]
    for row, label, keep in zip(flat_logits, flat_labels, flat_counted, strict=True):
        if not keep:
            for values, zero in zip(fields, (0.0, 0.0, False, 0.0), strict=True):
                values.append(zero)
            continue
        probs = torch.softmax(row, dim=-1)
        entropy = -sum(float(p) * float(torch.log(p)) for p in probs if p > 0)
        fields[0].append(entropy)
        fields[1].append(float(row.mean()))
        fields[2].append(int(label) == int(torch.argmax(row)))
        fields[3].append(float(torch.log((probs * probs).sum())))
    shape = labels.shape
    return TokenStats(
        torch.tensor(fields[0], dtype=torch.float64).reshape(shape),
        torch.tensor(fields[1], dtype=torch.float64).reshape(shape),
        torch.tensor(fields[2]).reshape(shape),
        torch.tensor(fields[3], dtype=torch.float64).reshape(shape),
    )


def _counted(labels, mask, shift):
    counted = (labels != -100) & mask
    if shift:
        counted[:, 0] = False
    return counted


def _scored_rows(logits, shift):
    """The logits each label position is scored by (row t - 1 with shift)."""
    if not shift:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def _assert_stats_close(got: TokenStats, want: TokenStats, tolerance: float):
    for name, g, w in zip(TokenStats._fields, got, want, strict=True):
        if name == "is_top1":
            assert g.dtype == torch.bool and torch.equal(g.cpu(), w), name
        else:
            torch.testing.assert_close(g.double().cpu(), w, rtol=tolerance, atol=tolerance)


# V = 5000 spans three float64 blocks (of 2048) in the Triton kernel: the running sums
# are rescaled across blocks
@pytest.mark.parametrize("vocab", [13, 5000])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_truth(backend, shift, vocab):
    logits, labels, mask = random_problem(2, 5, vocab, seed=vocab + shift)
    # the label is the argmax at a few counted positions, so that is_top1 is not all False
    labels[0, 2] = _scored_rows(logits, shift)[0, 2].argmax()
    labels[1, 3] = _scored_rows(logits, shift)[1, 3].argmax()
    mask[0, 2] = mask[1, 3] = True
    out = sequence_logprobs(
        logits, labels, mask, shift=shift, return_token_stats=True, backend=backend
    )
    counted = _counted(labels, mask, shift)
    want = naive_token_stats(_scored_rows(logits, shift).cpu(), labels.cpu(), counted.cpu())
    assert want.is_top1.any()
    _assert_stats_close(out.token_stats, want, 1e-10)
    assert out.token_logprobs is None  # stats do not imply token log-probs


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_and_linear_match_float64_truth(backend):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, 6, generator=generator, dtype=torch.float64).to(DEVICE)
    weight = torch.randn(40, 6, generator=generator, dtype=torch.float64).to(DEVICE)
    labels = torch.randint(0, 40, (11,), generator=generator).to(DEVICE)
    labels[4] = -100
    bounds = torch.tensor([0, 3, 3, 11], device=DEVICE)
    out = linear_sequence_logprobs(
        hidden,
        weight,
        labels,
        cu_seqlens=bounds,
        logit_scale=0.7,
        logit_softcap=5.0,
        chunk_rows=3,
        return_token_stats=True,
        backend=backend,
    )
    logits = torch.tanh(hidden @ weight.T * 0.7 / 5.0) * 5.0
    want = naive_token_stats(logits[None].cpu(), labels[None].cpu(), (labels != -100)[None].cpu())
    _assert_stats_close(TokenStats(*(t[None] for t in out.token_stats)), want, 1e-10)
    packed = sequence_logprobs(logits, labels, cu_seqlens=bounds, return_token_stats=True)
    _assert_stats_close(TokenStats(*(t[None] for t in packed.token_stats)), want, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_no_larger_than_eager(backend, dtype):
    logits, labels, mask = random_problem(3, 6, 3001, seed=7, scale=4.0)
    low = logits.to(dtype)
    counted = _counted(labels, mask, False)
    truth = naive_token_stats(logits.cpu(), labels.cpu(), counted.cpu())
    ours = sequence_logprobs(low, labels, mask, return_token_stats=True, backend=backend)
    # eager, as trainers compute these figures: float32 softmax of the low-precision logits
    eager_logits = low.float()
    probs = eager_logits.softmax(-1)
    log_probs = eager_logits.log_softmax(-1)
    eager = TokenStats(
        -(probs * log_probs).sum(-1),
        eager_logits.mean(-1),
        eager_logits.argmax(-1) == labels,
        (probs * probs).sum(-1).log(),
    )
    counted_cpu = counted.cpu()
    for name, got, base, want in zip(
        TokenStats._fields, ours.token_stats, eager, truth, strict=True
    ):
        if name == "is_top1":
            assert torch.equal(got.cpu(), base.cpu() & counted_cpu)
            continue
        assert got.dtype == torch.float32
        ours_error = (got.double().cpu() - want)[counted_cpu].abs().max()
        eager_error = (base.double().cpu() - want)[counted_cpu].abs().max()
        assert ours_error <= eager_error + 4 * torch.finfo(torch.float32).eps * 10, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_propagate_into_their_row_only(backend):
    logits, labels, _ = random_problem(1, 4, 9, seed=9)
    labels[:] = 1
    logits[0, 1, 3] = float("nan")
    logits[0, 2, :] = float("-inf")
    out = sequence_logprobs(logits, labels, return_token_stats=True, backend=backend)
    entropy = out.token_stats.entropy[0]
    assert torch.isnan(entropy[1]) and torch.isnan(entropy[2])
    assert torch.isfinite(entropy[[0, 3]]).all()
    assert out.token_stats.mean_logits[0, 2] == float("-inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_carry_no_gradient_and_leave_the_gradient_alone(backend):
    logits, labels, mask = random_problem(2, 5, 11, seed=10)
    leaf = logits.clone().requires_grad_()
    with_stats = sequence_logprobs(leaf, labels, mask, return_token_stats=True, backend=backend)
    assert not any(t.requires_grad for t in with_stats.token_stats)
    (got,) = torch.autograd.grad(with_stats.mean.sum(), leaf)
    plain = sequence_logprobs(leaf, labels, mask, backend=backend)
    (want,) = torch.autograd.grad(plain.mean.sum(), leaf)
    assert torch.equal(got, want)
    torch.testing.assert_close(with_stats.sum, plain.sum, rtol=0, atol=0)
    chosen, rejected = split_pairs(with_stats)
    assert chosen.token_stats.entropy.shape == (1, 5)
    assert torch.equal(rejected.token_stats.is_top1, with_stats.token_stats.is_top1[1:])


def test_stats_in_a_compiled_graph():
    logits, labels, mask = random_problem(2, 5, 11, dtype=torch.float32, seed=11)

    def entropy_and_loss(logits):
        out = sequence_logprobs(logits, labels, mask, shift=True, return_token_stats=True)
        return out.mean.sum(), out.token_stats.entropy.sum()

    want = entropy_and_loss(logits)
    got = torch.compile(entropy_and_loss, fullgraph=True)(logits)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["return_token_stats"])
def test_flag_must_be_a_bool(name):
    logits, labels, _ = random_problem(1, 3, 5)
    with pytest.raises(ValueError, match=rf"^{name}: expected a bool, got int"):
        sequence_logprobs(logits, labels, **{name: 1})
    with pytest.raises(ValueError, match=rf"^{name}: expected a bool, got str"):
        linear_sequence_logprobs(
            logits, torch.randn(4, 5, dtype=logits.dtype), labels, **{name: "y"}
        )
