"""Vocab-parallel inputs on a gloo group of 2: DTensor logits, a float64 gradcheck of the
sharded operators, and bad inputs, which raise a ValueError naming the argument on every
rank (the group stays usable afterwards: no rank is left waiting in a collective)."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import run_world
from helpers import naive_sequence_logprobs, upstream_gradients, weighted_objective
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import lenalign
from lenalign import VocabShard

VOCAB = 6


def problem(seed: int, vocab: int = VOCAB, steps: int = 4):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, steps, vocab, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (2, steps), generator=generator)
    labels[0, 1] = -100
    return logits, labels


def _dtensor(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    logits, labels = problem(0)
    out = {}
    for name, placement in (("shard", Shard(2)), ("replicate", Replicate())):
        spread = distribute_tensor(logits, mesh, [placement]).requires_grad_()
        result = lenalign.sequence_logprobs(
            spread, labels, shift=True, return_token_logprobs=True, backend="torch"
        )
        weights = upstream_gradients(2, labels.shape)
        weighted_objective(result.sum, result.mean, result.token_logprobs, weights).backward()
        grad = spread.grad
        out[name] = (
            result.sum,
            result.token_logprobs,
            isinstance(grad, DTensor) and tuple(grad.placements) == (placement,),
            grad.full_tensor(),
        )
    # torch's own tensor parallelism: a ColwiseParallel head hands back Shard(-1) logits
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    head = torch.nn.Linear(3, VOCAB, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, 3, generator=generator, dtype=torch.float64))
        head.bias.copy_(torch.randn(VOCAB, generator=generator, dtype=torch.float64))
    parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
    result = lenalign.sequence_logprobs(head(hidden), labels, shift=True, backend="torch")
    result.mean.sum().backward()
    out["colwise"] = (result.mean, head.weight.grad.full_tensor(), head.bias.grad.full_tensor())
    try:
        lenalign.sequence_logprobs(distribute_tensor(logits, mesh, [Shard(0)]), labels)
    except ValueError as error:
        out["wrong placement"] = str(error)
    return out


def _in_turns(rank: int, world: int, objective, inputs: tuple) -> bool:
    """gradcheck of ``objective`` in each rank's inputs in turn.

    The forward is collective, so every rank makes the same calls; but only the rank
    whose turn it is perturbs its real inputs, the others perturb stand-ins that the
    objective ignores: a perturbation on two ranks at once would measure the sum of two
    ranks' derivatives.
    """
    passed = False
    for turn in range(world):
        if rank == turn:
            passed = torch.autograd.gradcheck(objective, inputs, check_undefined_grad=False)
            continue
        stand_ins = tuple(torch.zeros_like(x).requires_grad_() for x in inputs)

        def follower(*ignored: torch.Tensor) -> torch.Tensor:
            unused = sum(x.sum() for x in ignored) * 0
            return objective(*(x.detach() for x in inputs)) + unused

        # the same calls in the same order; what it measures is the turn's rank's
        # perturbation, not a derivative of the stand-ins: its verdict is not read
        torch.autograd.gradcheck(
            follower, stand_ins, check_undefined_grad=False, raise_exception=False
        )
    return passed


def _gradcheck(rank: int, world: int) -> tuple[bool, bool]:
    logits, labels = problem(1)
    shard = VocabShard.from_vocab(VOCAB)
    local = logits[..., shard.start : shard.stop].clone().requires_grad_()
    weights = upstream_gradients(2, labels.shape, seed=2)

    def objective(part: torch.Tensor) -> torch.Tensor:
        result = lenalign.sequence_logprobs(
            part, labels, shift=True, return_token_logprobs=True, vocab_shard=shard
        )
        return weighted_objective(result.sum, result.mean, result.token_logprobs, weights)

    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, 3, generator=generator, dtype=torch.float64)
    local_weight = weight[shard.start : shard.stop].clone()

    def linear_objective(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        result = lenalign.linear_sequence_logprobs(
            h, w, labels, shift=True, logit_softcap=4.0, chunk_rows=2, vocab_shard=shard
        )
        return (result.sum * weights[0]).sum() + (result.mean * weights[1]).sum()

    logits_ok = _in_turns(rank, world, objective, (local,))
    # the hidden states are one input of the whole group (checked equal on every rank):
    # every rank perturbs them alike, and the gradient summed over the group is what
    # that measures; each rank's rows of the head in turn
    hidden_ok = torch.autograd.gradcheck(
        lambda h: linear_objective(h, local_weight),
        (hidden.clone().requires_grad_(),),
        check_undefined_grad=False,
    )
    weight_ok = _in_turns(
        rank, world, lambda w: linear_objective(hidden, w), (local_weight.requires_grad_(),)
    )
    linear_ok = hidden_ok and weight_ok
    return logits_ok, linear_ok


def _refusals(rank: int, world: int) -> dict[str, str]:
    """Each bad call's message on this rank, then proof that the group still works."""
    logits, labels = problem(2, vocab=11)
    shard = VocabShard.from_vocab(11)
    local = logits[..., shard.start : shard.stop]
    bad = {
        "overlap": lambda: lenalign.sequence_logprobs(
            logits[..., :6], labels, vocab_shard=VocabShard(5 * rank, 5 * rank + 6)
        ),
        "gap": lambda: lenalign.sequence_logprobs(
            logits[..., :5], labels, vocab_shard=VocabShard(6 * rank, 6 * rank + 5)
        ),
        "wider than the logits on rank 1": lambda: lenalign.sequence_logprobs(
            local[..., : local.shape[-1] - rank], labels, vocab_shard=shard
        ),
        "label outside [0, V)": lambda: lenalign.sequence_logprobs(
            local,
            labels.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(11)),
            vocab_shard=shard,
        ),
        "float labels on rank 1": lambda: lenalign.sequence_logprobs(
            local, labels.double() if rank == 1 else labels, vocab_shard=shard
        ),
        "labels that differ across ranks": lambda: lenalign.sequence_logprobs(
            local,
            torch.where(labels >= 0, (labels + rank).clamp(max=10), labels),
            vocab_shard=shard,
        ),
        "weight of the wrong width on rank 0": lambda: lenalign.linear_sequence_logprobs(
            torch.randn(2, 4, 3, dtype=torch.float64),
            torch.randn(shard.stop - shard.start, 3 + (rank == 0), dtype=torch.float64),
            labels,
            vocab_shard=shard,
        ),
        "not a VocabShard": lambda: lenalign.sequence_logprobs(
            local, labels, vocab_shard=(shard.start, shard.stop)
        ),
        "token stats on rank 0 only": lambda: lenalign.sequence_logprobs(
            local, labels, vocab_shard=shard, return_token_stats=rank == 0
        ),
        "float32 logits on rank 1": lambda: lenalign.sequence_logprobs(
            local.float() if rank == 1 else local, labels, vocab_shard=shard
        ),
        "reduce_hidden_grad on rank 0 only": lambda: lenalign.linear_sequence_logprobs(
            torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(shard.stop - shard.start, 3, dtype=torch.float64),
            labels,
            vocab_shard=VocabShard(shard.start, shard.stop, reduce_hidden_grad=rank == 0),
        ),
        "an empty shard past the end, a label beyond the rest": lambda: lenalign.sequence_logprobs(
            logits if rank == 0 else logits[..., :0],
            labels.index_put((torch.tensor(0), torch.tensor(2)), torch.tensor(50)),
            vocab_shard=VocabShard(0, 11) if rank == 0 else VocabShard(100, 100),
        ),
    }
    messages = {}
    for name, call in bad.items():
        try:
            call()
            messages[name] = "no error"
        except ValueError as error:
            messages[name] = str(error)
    ok = lenalign.sequence_logprobs(local, labels, vocab_shard=shard)
    messages["afterwards"] = ok.sum
    return messages


def _layouts(rank: int, world: int) -> dict:
    """Shards out of rank order, an empty one past the end, a nan in the other shard."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randint(-2, 3, (2, 4, 11), generator=generator).double()
    labels = torch.randint(0, 11, (2, 4), generator=generator)
    layouts = {
        "reversed": [(6, 11), (0, 6)],
        "empty past the end": [(0, 11), (100, 100)],
        "empty inside": [(0, 11), (3, 3)],
    }
    out = {}
    for name, bounds in layouts.items():
        start, stop = bounds[rank]
        result = lenalign.sequence_logprobs(
            logits[..., start:stop] if stop > start else logits[..., :0],
            labels,
            return_token_logprobs=True,
            return_token_stats=True,
            vocab_shard=VocabShard(start, stop),
        )
        out[name] = (result.token_logprobs, *result.token_stats)
    # a nan in rank 1's columns of row (0, 0), whose label rank 0 holds
    poisoned, nan_labels = logits.clone(), labels.clone()
    poisoned[0, 0, 8], nan_labels[0, 0] = float("nan"), 1
    poisoned[0, 0, 1] = 10.0  # the label is the largest finite logit
    start, stop = (0, 6) if rank == 0 else (6, 11)
    result = lenalign.sequence_logprobs(
        poisoned[..., start:stop],
        nan_labels,
        return_token_logprobs=True,
        return_token_stats=True,
        vocab_shard=VocabShard(start, stop),
    )
    out["nan"] = (result.token_logprobs, *result.token_stats)
    return out


def _compiled(rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """A loss through a vocab_shard call, eager and under torch.compile (the call runs
    eagerly inside the compiled function, a graph break)."""
    logits, labels = problem(6)
    shard = VocabShard.from_vocab(VOCAB)

    def loss(part: torch.Tensor) -> torch.Tensor:
        result = lenalign.sequence_logprobs(part, labels, shift=True, vocab_shard=shard)
        return (result.mean * 2).sum()

    values, grads = [], []
    for function in (loss, torch.compile(loss)):
        local = logits[..., shard.start : shard.stop].clone().requires_grad_()
        value = function(local)
        value.backward()
        values.append(value.detach())
        grads.append(local.grad)
    return (*values, *grads)


def worker(rank: int, world: int) -> dict:
    return {
        "dtensor": _dtensor(rank, world),
        "gradcheck": _gradcheck(rank, world),
        "refusals": _refusals(rank, world),
        "layouts": _layouts(rank, world),
        "compiled": _compiled(rank, world),
    }


@pytest.fixture(scope="module")
def ranks():
    return run_world(worker, 2, timeout=240)


def test_dtensor_logits_match_truth_and_keep_their_placement(ranks):
    logits, labels = problem(0)
    full = logits.clone().requires_grad_()
    expected = naive_sequence_logprobs(full, labels, shift=True)
    weights = upstream_gradients(2, labels.shape)
    weighted_objective(expected[0], expected[1], expected[3], weights).backward()
    for rank in ranks:
        for name in ("shard", "replicate"):
            seq_sum, tokens, placed, grad = rank["dtensor"][name]
            torch.testing.assert_close(seq_sum, expected[0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(tokens, expected[3], rtol=1e-10, atol=1e-10)
            assert placed, name
            torch.testing.assert_close(grad, full.grad, rtol=1e-10, atol=1e-10)
        assert rank["dtensor"]["wrong placement"].startswith("logits: expected a DTensor placed")
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, 3, generator=generator, dtype=torch.float64).requires_grad_()
    bias = torch.randn(VOCAB, generator=generator, dtype=torch.float64).requires_grad_()
    head_logits = hidden @ weight.T + bias
    expected_mean = naive_sequence_logprobs(head_logits, labels, shift=True)[1]
    expected_mean.sum().backward()
    for rank in ranks:
        mean, grad_weight, grad_bias = rank["dtensor"]["colwise"]
        torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad_weight, weight.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad_bias, bias.grad, rtol=1e-10, atol=1e-10)


def test_gradcheck_float64_of_the_sharded_operators(ranks):
    for rank in ranks:
        assert rank["gradcheck"] == (True, True)


REFUSED_ARGUMENT = {
    "overlap": "vocab_shard: expected shards that tile [0, V)",
    "gap": "vocab_shard: expected shards that tile [0, V)",
    "wider than the logits on rank 1": "logits: expected",
    "label outside [0, V)": "labels: expected values in [0, 11)",
    "float labels on rank 1": "labels: expected an integer dtype",
    "labels that differ across ranks": "labels: expected the same labels",
    "weight of the wrong width on rank 0": "weight: expected shape",
    "not a VocabShard": "vocab_shard: expected a lenalign.VocabShard",
    "token stats on rank 0 only": "return_token_stats: expected the same value on every rank",
    "float32 logits on rank 1": "logits.dtype: expected the same value on every rank",
    "reduce_hidden_grad on rank 0 only": "vocab_shard.reduce_hidden_grad: expected the same",
    "an empty shard past the end, a label beyond the rest": "labels: expected values in [0, 11)",
}


def test_bad_input_raises_on_every_rank(ranks):
    for rank in ranks:
        for name, start in REFUSED_ARGUMENT.items():
            assert rank["refusals"][name].startswith(start), (name, rank["refusals"][name])
    # the rank whose input was wrong names itself to the others
    assert "(on rank 1;" in ranks[0]["refusals"]["float labels on rank 1"]
    assert "(on rank 0;" in ranks[1]["refusals"]["weight of the wrong width on rank 0"]
    assert torch.equal(ranks[0]["refusals"]["afterwards"], ranks[1]["refusals"]["afterwards"])


def test_shard_layouts_out_of_rank_order_and_empty(ranks):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randint(-2, 3, (2, 4, 11), generator=generator).double()
    labels = torch.randint(0, 11, (2, 4), generator=generator)
    whole = lenalign.sequence_logprobs(
        logits, labels, return_token_logprobs=True, return_token_stats=True, backend="torch"
    )
    expected = (whole.token_logprobs, *whole.token_stats)
    assert bool(expected[3].any()) and not bool(expected[3].all())  # top-1 hits and misses
    for rank in ranks:
        for name in ("reversed", "empty past the end", "empty inside"):
            for want, have in zip(expected, rank["layouts"][name], strict=True):
                torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10, msg=name)


def test_a_nan_in_another_shard_poisons_the_row(ranks):
    for rank in ranks:
        token_logprobs, entropy, _mean, is_top1, log_sum_sq = rank["layouts"]["nan"]
        for values in (token_logprobs, entropy, log_sum_sq):
            assert torch.isnan(values[0, 0]) and torch.isfinite(values[1]).all()
        assert not bool(is_top1[0, 0])


def test_a_compiled_loss_runs_the_sharded_call(ranks):
    for rank in ranks:
        eager, compiled, eager_grad, compiled_grad = rank["compiled"]
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-12, atol=1e-12)
        assert bool(eager_grad.abs().sum() > 0)
