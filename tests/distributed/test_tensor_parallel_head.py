"""Tensor parallelism on a gloo group of 2: the LM head's weight a DTensor placed
Shard(0) (what ColwiseParallel makes of it), scored with
``vocab_shard=VocabShard.from_dtensor(weight)``, never gathered.

Values and gradients against a single-process float64 truth (V = 11 over 2 ranks: 6 and
5 rows; padded and packed; bias; logit_scale and softcap), the weight's and bias's
gradients DTensors placed alike; a profiled call forms no [*, V] tensor and no [V, H]
weight on any rank; and bad input raises a ValueError naming the argument on every rank.
"""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import run_world
from helpers import naive_sequence_logprobs, upstream_gradients, weighted_objective
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from torch.profiler import ProfilerActivity, profile

import lenalign
from lenalign import VocabShard

VOCAB, HIDDEN, BATCH, STEPS = 11, 5, 2, 6
CU_SEQLENS = torch.tensor([0, 4, 4, 9, 12])
SCALE, SOFTCAP = 0.7, 5.0


def head_problem(seed: int, packed: bool):
    """hidden [B, T, H] (or packed [N, H]), weight [V, H], bias [V] in float64, labels."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, STEPS, HIDDEN, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64)
    bias = torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (BATCH, STEPS), generator=generator)
    labels[torch.rand(BATCH, STEPS, generator=generator) < 0.2] = -100
    if packed:
        hidden, labels = hidden.reshape(-1, HIDDEN), labels.reshape(-1)
    return hidden, weight, bias, labels, CU_SEQLENS if packed else None


def _score(hidden, weight, bias, labels, cu_seqlens, shard, seed):
    """The call under test and its weighted backward; the outputs and gradients."""
    hidden = hidden.clone().requires_grad_()
    result = lenalign.linear_sequence_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        shift=True,
        cu_seqlens=cu_seqlens,
        return_token_logprobs=True,
        logit_scale=SCALE,
        logit_softcap=SOFTCAP,
        chunk_rows=3,
        vocab_shard=shard,
    )
    weights = upstream_gradients(result.sum.shape[0], labels.shape, seed=seed)
    weighted_objective(result.sum, result.mean, result.token_logprobs, weights).backward()
    return result, hidden.grad


# events that take the DTensor parameter itself (its to_local, the AccumulateGrad of its
# gradient, and their detach), which the profiler records with the logical [V, H] shape
# although they hold only the local rows
DTENSOR_WRAPPER_EVENTS = {
    "_ToTorchTensor",
    "torch::autograd::AccumulateGrad",
    "aten::detach",
    "detach",
    "PythonSubclass",
}


def _values(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for packed in (False, True):
        hidden, weight, bias, labels, cu_seqlens = head_problem(seed=1, packed=packed)
        weight = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        bias = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
        shard = VocabShard.from_dtensor(weight)
        result, hidden_grad = _score(hidden, weight, bias, labels, cu_seqlens, shard, seed=2)
        grads = (weight.grad, bias.grad)
        out[packed] = {
            "shard": (shard.start, shard.stop),
            "outputs": (result.sum, result.mean, result.count, result.token_logprobs),
            "hidden_grad": hidden_grad,
            "placements": [
                isinstance(grad, DTensor) and tuple(grad.placements) == (Shard(0),)
                for grad in grads
            ],
            "local_rows": [grad.to_local().shape[0] for grad in grads],
            "grads": [grad.full_tensor() for grad in grads],
        }
    # torch's own ColwiseParallel on an nn.Linear head; its parameters are the DTensors
    hidden, weight, bias, labels, _ = head_problem(seed=3, packed=False)
    head = torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    parallelize_module(head, mesh, ColwiseParallel())
    shard = VocabShard.from_dtensor(head.weight)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        result, hidden_grad = _score(hidden, head.weight, head.bias, labels, None, shard, seed=4)
    shapes = {
        tuple(shape)
        for event in prof.events()
        if event.name not in DTENSOR_WRAPPER_EVENTS
        for shape in (event.input_shapes or ())
        if shape
    }
    out["colwise"] = {
        "outputs": (result.sum, result.mean, result.count, result.token_logprobs),
        "hidden_grad": hidden_grad,
        "grads": [head.weight.grad.full_tensor(), head.bias.grad.full_tensor()],
        "vocab_wide": sorted(s for s in shapes if s[-1] == VOCAB or s == (VOCAB, HIDDEN)),
        "local_head_seen": (shard.stop - shard.start, HIDDEN) in shapes,
    }
    return out


def _refusals(rank: int, world: int) -> dict[str, str]:
    """Each bad call's message on this rank, then proof that the group still works."""
    mesh = init_device_mesh("cpu", (world,))
    hidden, weight, bias, labels, _ = head_problem(seed=5, packed=False)
    split = distribute_tensor(weight, mesh, [Shard(0)])
    split_bias = distribute_tensor(bias, mesh, [Shard(0)])  # a collective: on every rank
    shard = VocabShard.from_dtensor(split)
    flat_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    bad = {
        "replicated weight": lambda: VocabShard.from_dtensor(
            distribute_tensor(weight, mesh, [Replicate()])
        ),
        "a 2-D mesh": lambda: VocabShard.from_dtensor(
            distribute_tensor(weight, flat_mesh, [Replicate(), Shard(0)])
        ),
        "a plain tensor": lambda: VocabShard.from_dtensor(weight),
        "DTensor weight without vocab_shard": lambda: lenalign.linear_sequence_logprobs(
            hidden, split, labels
        ),
        "a shard that is not the placement's on rank 1": lambda: lenalign.linear_sequence_logprobs(
            hidden,
            split,
            labels,
            vocab_shard=shard if rank == 0 else VocabShard(shard.start, shard.stop - 1),
        ),
        "hidden states that differ across ranks": lambda: lenalign.linear_sequence_logprobs(
            hidden + rank * 1e-12, split, labels, vocab_shard=shard
        ),
        "a bias on rank 0 only": lambda: lenalign.linear_sequence_logprobs(
            hidden,
            split,
            labels,
            bias=split_bias if rank == 0 else None,
            vocab_shard=shard,
        ),
    }
    messages = {}
    for name, call in bad.items():
        try:
            call()
            messages[name] = "no error"
        except ValueError as error:
            messages[name] = str(error)
    ok = lenalign.linear_sequence_logprobs(hidden, split, labels, vocab_shard=shard)
    messages["afterwards"] = ok.sum
    return messages


def worker(rank: int, world: int) -> dict:
    return {"values": _values(rank, world), "refusals": _refusals(rank, world)}


@pytest.fixture(scope="module")
def ranks():
    return run_world(worker, 2, timeout=240)


def truth(seed: int, packed: bool, gradient_seed: int):
    """Outputs and the gradients of hidden, weight and bias in one float64 process."""
    hidden, weight, bias, labels, cu_seqlens = head_problem(seed, packed)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = (leaves[0] @ leaves[1].T + leaves[2]) * SCALE
    logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    expected = naive_sequence_logprobs(logits, labels, shift=True, cu_seqlens=cu_seqlens)
    weights = upstream_gradients(expected[0].shape[0], labels.shape, seed=gradient_seed)
    weighted_objective(expected[0], expected[1], expected[3], weights).backward()
    return expected, [leaf.grad for leaf in leaves]


def assert_matches(got: dict, expected, grads) -> None:
    for want, have in zip(expected, got["outputs"], strict=True):
        torch.testing.assert_close(have.to(want.dtype), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got["hidden_grad"], grads[0], rtol=1e-10, atol=1e-10)
    for want, have in zip(grads[1:], got["grads"], strict=True):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_dtensor_head_matches_single_process_float64(ranks, packed):
    expected, grads = truth(1, packed, gradient_seed=2)
    for rank, result in enumerate(ranks):
        got = result["values"][packed]
        assert got["shard"] == ((0, 6), (6, 11))[rank]
        assert got["placements"] == [True, True]  # gradients are DTensors placed Shard(0)
        assert got["local_rows"] == [6 - rank, 6 - rank]
        assert_matches(got, expected, grads)


def test_colwise_parallel_head_never_gathered(ranks):
    expected, grads = truth(3, False, gradient_seed=4)
    for result in ranks:
        got = result["values"]["colwise"]
        assert_matches(got, expected, grads)
        # the profiler sees inside lenalign's operators (the local [V_r, H] rows), and
        # no op on any rank takes a [*, V] tensor or the [V, H] weight
        assert got["local_head_seen"]
        assert got["vocab_wide"] == []


EXPECTED_REFUSALS = {
    "replicated weight": "weight: expected a DTensor placed Shard(0) on a 1-D mesh",
    "a 2-D mesh": "weight: expected a DTensor placed Shard(0) on a 1-D mesh",
    "a plain tensor": "weight: expected a DTensor placed Shard(0)",
    "DTensor weight without vocab_shard": "weight: expected a torch.Tensor, not a DTensor",
    "a shard that is not the placement's on rank 1": "vocab_shard: expected the split of",
    "hidden states that differ across ranks": "hidden: expected the same hidden states",
    "a bias on rank 0 only": "bias",
}


def test_bad_input_raises_on_every_rank(ranks):
    for rank, result in enumerate(ranks):
        messages = result["refusals"]
        for name, prefix in EXPECTED_REFUSALS.items():
            assert messages[name].startswith(prefix), (rank, name, messages[name])
        torch.testing.assert_close(messages["afterwards"], ranks[0]["refusals"]["afterwards"])
