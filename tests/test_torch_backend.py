"""The torch backend's compiled forward statistics: the same results as its eager ops,
on every dtype and on non-finite rows, and an eager fallback where compiling fails."""

from __future__ import annotations

import pytest
import torch
from helpers import naive_sequence_logprobs, random_problem

from lenalign import sequence_logprobs, torch_backend


@pytest.fixture
def compiled_forward(monkeypatch):
    """Every CPU call of the torch backend takes the compiled statistics."""
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_LOGITS", 0)
    monkeypatch.setattr(torch_backend, "_compiled", {})


def _rows_with_non_finite(dtype):
    generator = torch.Generator().manual_seed(2)
    z = (torch.randn(6, 37, generator=generator) * 4).to(dtype)
    z[1, 5] = float("inf")
    z[2, 7] = float("nan")
    z[3] = float("-inf")
    z[4, :30] = float("-inf")
    return z


@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_compiled_statistics_equal_the_eager_ops(compiled_forward, dtype, stats):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = _rows_with_non_finite(dtype)
    got = torch_backend._statistics(z, acc, stats, compiled_call=True)
    assert torch_backend._compiled["fn"] is not None
    want = torch_backend.row_statistics(z, acc, stats)
    assert len(got) == len(want) == (6 if stats else 2)
    for g, w in zip(got, want, strict=True):
        if not g.is_floating_point():  # the argmax
            assert torch.equal(g, w)
            continue
        assert g.dtype == acc
        # fused exp and sum may round differently from the eager ops, by a few ulps of
        # the sum (log_sum is near 0 where one logit dominates: hence an absolute term)
        eps = torch.finfo(acc).eps
        torch.testing.assert_close(g, w, rtol=4 * eps, atol=8 * eps, equal_nan=True)
    assert torch.isnan(got[1][[1, 2]]).all()  # +inf and nan reach the sum
    assert got[0][3] == 0 and got[1][3] == float("-inf")  # an all -inf row


def test_compiled_forward_matches_the_float64_truth(compiled_forward):
    logits, labels, mask = random_problem(3, 9, 13, seed=4)
    out = sequence_logprobs(logits, labels, mask, shift=True, backend="torch")
    truth = naive_sequence_logprobs(logits, labels, mask, shift=True)
    torch.testing.assert_close(out.sum, truth[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mean, truth[1], rtol=1e-12, atol=1e-12)
    assert torch_backend._compiled["fn"] is not None


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(compiled_forward, monkeypatch):
    attempts = []

    def broken(*args, **kwargs):
        attempts.append(args)
        raise RuntimeError("no C++ compiler")

    eager_rows = []
    eager = torch_backend.row_statistics

    def counted_eager(z, *args):
        eager_rows.append(len(z))
        return eager(z, *args)

    monkeypatch.setattr(torch_backend, "_compiled", {"fn": broken})
    monkeypatch.setattr(torch_backend, "row_statistics", counted_eager)
    # one-row chunks: the call walks several runs, and only the first tries the compiler
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 11)
    logits, labels, mask = random_problem(2, 6, 11, seed=5)
    with pytest.warns(RuntimeWarning, match="runs its forward eagerly: .*no C\\+\\+ compiler"):
        out = sequence_logprobs(logits, labels, mask, backend="torch")
    assert len(attempts) == 1
    # the eager ops hold [rows, V] buffers: they take a chunk at a time, even of the whole
    # run that was handed to the compiled kernel
    assert max(eager_rows) == 1 and sum(eager_rows) == int(((labels != -100) & mask).sum())
    truth = naive_sequence_logprobs(logits, labels, mask)
    torch.testing.assert_close(out.sum, truth[0], rtol=1e-12, atol=1e-12)
    assert torch_backend._compiled["fn"] is None  # and eager from then on


def test_compiled_forward_inside_a_compiled_graph(compiled_forward):
    logits, labels, mask = random_problem(2, 7, 10, dtype=torch.float32, seed=6)

    def total(logits):
        return sequence_logprobs(logits, labels, mask, shift=True, backend="torch").sum.sum()

    leaf = logits.clone().requires_grad_()
    want = total(leaf)
    (want_grad,) = torch.autograd.grad(want, leaf)
    got = torch.compile(total, fullgraph=True)(leaf)
    (got_grad,) = torch.autograd.grad(got, leaf)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)
    assert torch_backend._compiled["fn"] is not None


def test_the_compiled_forward_takes_whole_runs_in_one_call(compiled_forward, monkeypatch):
    # one call per run of counted rows, not one per CHUNK_ELEMENTS chunk: each call is a
    # parallel region that waits for its slowest thread, which another process on a core
    # makes slow (docs/benchmarks.md, "Under a background load")
    calls = []
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 11)  # one-row chunks
    logits, labels, _ = random_problem(2, 6, 11, seed=7, ignored_fraction=0.0)
    labels[:, :2] = -100  # a prompt of two positions: one counted run of 4 rows per entry
    sequence_logprobs(logits, labels, backend="torch")  # compiles
    compiled = torch_backend._compiled["fn"]

    def counted_compiled(z, *args):
        calls.append(len(z))
        return compiled(z, *args)

    monkeypatch.setitem(torch_backend._compiled, "fn", counted_compiled)
    out = sequence_logprobs(logits, labels, backend="torch")
    assert calls == [4, 4]
    truth = naive_sequence_logprobs(logits, labels, None)
    torch.testing.assert_close(out.sum, truth[0], rtol=1e-12, atol=1e-12)
