"""Vocab-parallel sequence_logprobs / linear_sequence_logprobs on gloo groups of 2 and 3.

Each rank holds a torch.chunk slice of the vocabulary (V not divisible by the world,
and a world with an empty last shard); the results every rank gets, and each rank's
slice of the gradient, are checked against a single-process float64 truth computed here
from the whole logits. The workers return what they computed; the parent compares.
"""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import run_world
from helpers import naive_sequence_logprobs, upstream_gradients, weighted_objective

import lenalign
from lenalign import VocabShard
from lenalign.vocab_shard import chunk_bounds

# (vocab, packed, shift, backend, dtype)
LOGITS_CASES = [
    (11, False, True, "torch", torch.float64),
    (11, True, False, "torch", torch.float64),
    (11, True, True, "triton", torch.float64),
    (11, False, False, "triton", torch.float64),
    (4, False, True, "torch", torch.float64),  # world 3: the last shard is empty
    (11, False, True, "torch", torch.float32),
]
LINEAR_CASES = [("torch", False), ("triton", True)]  # (backend, packed)
BATCH, STEPS, HIDDEN = 2, 5, 6
CU_SEQLENS = torch.tensor([0, 3, 3, 7, 10])


def problem(vocab: int, packed: bool, seed: int, integer_logits: bool = False):
    """Logits [B, T, V] (or packed [N, V]) in float64, labels, mask, cu_seqlens or None."""
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH * STEPS, vocab) if packed else (BATCH, STEPS, vocab)
    if integer_logits:  # ties of the maximum across shards
        logits = torch.randint(-2, 3, shape, generator=generator).double()
    else:
        logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, shape[:-1], generator=generator)
    labels[torch.rand(shape[:-1], generator=generator) < 0.2] = -100
    mask = torch.rand(shape[:-1], generator=generator) > 0.2
    return logits, labels, mask, CU_SEQLENS if packed else None


def head_problem(seed: int):
    """Hidden [B, T, H], weight [V, H], bias [V] in float64, labels, mask."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, STEPS, HIDDEN, generator=generator, dtype=torch.float64)
    weight = torch.randn(11, HIDDEN, generator=generator, dtype=torch.float64)
    bias = torch.randn(11, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 11, (BATCH, STEPS), generator=generator)
    mask = torch.rand(BATCH, STEPS, generator=generator) > 0.2
    return hidden, weight, bias, labels, mask


def transformed(logits: torch.Tensor) -> torch.Tensor:
    """The head transform of the linear cases: scale 0.7, then soft cap 5."""
    return 5.0 * torch.tanh(logits * 0.7 / 5.0)


def _logits_results(rank: int, world: int) -> dict:
    out = {}
    for index, (vocab, packed, shift, backend, dtype) in enumerate(LOGITS_CASES):
        logits, labels, mask, cu_seqlens = problem(vocab, packed, seed=index)
        shard = VocabShard.from_vocab(vocab)
        local = logits[..., shard.start : shard.stop].to(dtype).requires_grad_()
        result = lenalign.sequence_logprobs(
            local,
            labels,
            mask,
            shift=shift,
            cu_seqlens=cu_seqlens,
            return_token_logprobs=True,
            vocab_shard=shard,
            backend=backend,
        )
        weights = upstream_gradients(result.sum.shape[0], labels.shape, seed=index)
        weighted_objective(result.sum, result.mean, result.token_logprobs, weights).backward()
        out[index] = (*result[:4], local.grad, shard.start, shard.stop)
    # per-token statistics, with ties of the max across shards
    for backend in ("torch", "triton"):
        logits, labels, mask, _ = problem(11, False, seed=7, integer_logits=True)
        shard = VocabShard.from_vocab(11)
        result = lenalign.sequence_logprobs(
            logits[..., shard.start : shard.stop],
            labels,
            mask,
            shift=True,
            return_token_stats=True,
            vocab_shard=shard,
            backend=backend,
        )
        out[f"stats-{backend}"] = tuple(result.token_stats)
    return out


def _linear_results(rank: int, world: int) -> dict:
    out = {}
    for index, (backend, packed) in enumerate(LINEAR_CASES):
        hidden, weight, bias, labels, mask = head_problem(seed=10 + index)
        cu_seqlens = None
        if packed:
            hidden, labels, mask = hidden.reshape(-1, HIDDEN), labels.reshape(-1), mask.reshape(-1)
            cu_seqlens = CU_SEQLENS
        for reduce in (True, False):
            shard = VocabShard.from_vocab(11, reduce_hidden_grad=reduce)
            leaves = [
                hidden.clone().requires_grad_(),
                weight[shard.start : shard.stop].clone().requires_grad_(),
                bias[shard.start : shard.stop].clone().requires_grad_(),
            ]
            result = lenalign.linear_sequence_logprobs(
                leaves[0],
                leaves[1],
                labels,
                mask,
                bias=leaves[2],
                shift=True,
                cu_seqlens=cu_seqlens,
                return_token_logprobs=True,
                return_token_stats=True,
                logit_scale=0.7,
                logit_softcap=5.0,
                chunk_rows=3,
                vocab_shard=shard,
                backend=backend,
            )
            weights = upstream_gradients(result.sum.shape[0], labels.shape, seed=index)
            weighted_objective(result.sum, result.mean, result.token_logprobs, weights).backward()
            grads = tuple(leaf.grad for leaf in leaves)
            out[(index, reduce)] = (*result[:4], tuple(result.token_stats), *grads)
    return out


def _determinism(rank: int, world: int) -> list[torch.Tensor]:
    logits, labels, mask, _ = problem(11, False, seed=3)
    shard = VocabShard.from_vocab(11)
    local = logits[..., shard.start : shard.stop].float()
    runs = []
    for _ in range(2):
        result = lenalign.sequence_logprobs(
            local, labels, mask, shift=True, return_token_logprobs=True, vocab_shard=shard
        )
        runs.append(torch.cat([result.sum, result.mean, result.token_logprobs.flatten()]))
    return runs


def _pair_losses(rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """SimPO from vocab-parallel logits and head rows; its gradient of this rank's slice."""
    logits, labels, mask, _ = problem(11, False, seed=5)
    hidden, weight, _bias, _, _ = head_problem(seed=6)
    shard = VocabShard.from_vocab(11)
    local = logits[..., shard.start : shard.stop].clone().requires_grad_()
    from_logits = lenalign.preference_loss_from_logits(
        local, labels, mask, vocab_shard=shard, loss_type="simpo", length_normalization="mean"
    )
    from_logits.loss.backward()
    from_hidden = lenalign.preference_loss_from_hidden(
        hidden, weight[shard.start : shard.stop], labels, mask, vocab_shard=shard,
        loss_type="simpo",
    )  # fmt: skip
    return from_logits.loss, local.grad, from_hidden.loss


def worker(rank: int, world: int) -> dict:
    """Everything a rank computes, for the parent to check."""
    return {
        "pair losses": _pair_losses(rank, world),
        "logits": _logits_results(rank, world),
        "linear": _linear_results(rank, world) if world == 2 else {},
        "determinism": _determinism(rank, world),
    }


def _truth(logits, labels, mask, shift, cu_seqlens, index):
    full = logits.clone().requires_grad_()
    expected = naive_sequence_logprobs(full, labels, mask, shift=shift, cu_seqlens=cu_seqlens)
    weights = upstream_gradients(expected[0].shape[0], labels.shape, seed=index)
    weighted_objective(expected[0], expected[1], expected[3], weights).backward()
    return expected, full.grad


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world_results(request):
    return request.param, run_world(worker, request.param, timeout=240)


def test_logits_match_single_process_float64(world_results):
    world, ranks = world_results
    for index, (vocab, packed, shift, _backend, dtype) in enumerate(LOGITS_CASES):
        logits, labels, mask, cu_seqlens = problem(vocab, packed, seed=index)
        (seq_sum, seq_mean, seq_count, tokens), grad = _truth(
            logits, labels, mask, shift, cu_seqlens, index
        )
        tolerance = 1e-10 if dtype == torch.float64 else 2e-5
        for rank in range(world):
            got_sum, got_mean, got_count, got_tokens, local_grad, start, stop = ranks[rank][
                "logits"
            ][index]
            assert torch.equal(got_count, seq_count)
            torch.testing.assert_close(got_sum.double(), seq_sum, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(got_mean.double(), seq_mean, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(got_tokens.double(), tokens, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(
                local_grad.double(), grad[..., start:stop], rtol=tolerance, atol=tolerance
            )
        shards = sorted(
            (ranks[r]["logits"][index][5], ranks[r]["logits"][index][6]) for r in range(world)
        )
        assert shards[0][0] == 0 and shards[-1][1] == vocab
        if vocab == 4 and world == 3:
            assert shards[-1] == (4, 4)  # the empty shard took part


def test_outputs_replicated_and_deterministic(world_results):
    world, ranks = world_results
    first = ranks[0]["determinism"][0]
    for rank in range(world):
        for run in ranks[rank]["determinism"]:
            assert torch.equal(run, first)  # bit for bit: across runs and ranks


def test_token_stats_match_single_process(world_results):
    world, ranks = world_results
    logits, labels, mask, _ = problem(11, False, seed=7, integer_logits=True)
    expected = lenalign.sequence_logprobs(
        logits, labels, mask, shift=True, return_token_stats=True, backend="torch"
    ).token_stats
    assert bool(expected.is_top1.any()) and not bool(expected.is_top1.all())
    for rank in range(world):
        for backend in ("torch", "triton"):
            got = ranks[rank]["logits"][f"stats-{backend}"]
            for name, want, have in zip(expected._fields, expected, got, strict=True):
                if want.dtype == torch.bool:
                    assert torch.equal(have, want), name
                else:
                    torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10, msg=name)


def test_linear_matches_single_process_float64(world_results):
    world, ranks = world_results
    if world != 2:
        pytest.skip("the linear path runs on the world of 2")
    for index, (_backend, packed) in enumerate(LINEAR_CASES):
        hidden, weight, bias, labels, mask = head_problem(seed=10 + index)
        cu_seqlens = None
        if packed:
            hidden, labels, mask = hidden.reshape(-1, HIDDEN), labels.reshape(-1), mask.reshape(-1)
            cu_seqlens = CU_SEQLENS
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logits = transformed(leaves[0] @ leaves[1].T + leaves[2])
        expected = naive_sequence_logprobs(logits, labels, mask, shift=True, cu_seqlens=cu_seqlens)
        weights = upstream_gradients(expected[0].shape[0], labels.shape, seed=index)
        weighted_objective(expected[0], expected[1], expected[3], weights).backward()
        stats = lenalign.sequence_logprobs(
            logits.detach(),
            labels,
            mask,
            shift=True,
            cu_seqlens=cu_seqlens,
            return_token_stats=True,
            backend="torch",
        ).token_stats
        hidden_parts = []
        for rank in range(world):
            start, stop = chunk_bounds(11, world, rank)
            for reduce in (True, False):
                got = ranks[rank]["linear"][(index, reduce)]
                for want, have in zip(expected[:3], got[:3], strict=True):
                    torch.testing.assert_close(have.double(), want.double(), rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(got[3], expected[3], rtol=1e-10, atol=1e-10)
                for want, have in zip(stats, got[4], strict=True):
                    torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10)
                grad_hidden, grad_weight, grad_bias = got[5:]
                torch.testing.assert_close(
                    grad_weight, leaves[1].grad[start:stop], rtol=1e-10, atol=1e-10
                )
                torch.testing.assert_close(
                    grad_bias, leaves[2].grad[start:stop], rtol=1e-10, atol=1e-10
                )
                if reduce:
                    torch.testing.assert_close(grad_hidden, leaves[0].grad, rtol=1e-10, atol=1e-10)
                else:
                    hidden_parts.append(grad_hidden)
        # each rank's own part: they sum to the full gradient, and none is it alone
        torch.testing.assert_close(sum(hidden_parts), leaves[0].grad, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(hidden_parts[0], leaves[0].grad)


def test_pair_losses_from_vocab_parallel_inputs(world_results):
    world, ranks = world_results
    logits, labels, mask, _ = problem(11, False, seed=5)
    hidden, weight, _bias, _, _ = head_problem(seed=6)
    full = logits.clone().requires_grad_()
    expected = lenalign.preference_loss_from_logits(
        full, labels, mask, loss_type="simpo", length_normalization="mean"
    )
    expected.loss.backward()
    from_hidden = lenalign.preference_loss_from_hidden(
        hidden, weight, labels, mask, loss_type="simpo"
    ).loss
    for rank in range(world):
        loss, local_grad, hidden_loss = ranks[rank]["pair losses"]
        start, stop = chunk_bounds(11, world, rank)
        torch.testing.assert_close(loss, expected.loss, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(local_grad, full.grad[..., start:stop], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(hidden_loss, from_hidden, rtol=1e-10, atol=1e-10)
