"""The fused head under FSDP2 and DDP: steps on 2 gloo ranks equal single-process steps
on the whole batch.

The models are tiny Llamas built in code (32 wide, 2 layers, 300 tokens), float32 on
CPU. Each rank gets half of the pairs and its loss is the mean over them; FSDP2
(reduce-scatter) and DDP (all-reduce) both average the gradients over the ranks, so
with equal halves the step is the one of the mean over all pairs. The truth is
lenalign's single-process fused-head path (``forward_head_input``, then
``linear_sequence_logprobs``) in this process; the gradients are compared as well as
the parameters after SGD, which only scales them. Every scenario runs in one world
(each start costs seconds of imports), and fails only its own test.
"""

from __future__ import annotations

import traceback
from functools import partial

import pytest
import torch
from distributed_helpers import run_world
from transformers import LlamaConfig, LlamaForCausalLM

from lenalign import linear_sequence_logprobs, preference_loss
from lenalign.distributed import (
    CausalLMLogProbs,
    causal_lm_logprobs,
    head_logprobs,
    owning_unit,
)
from lenalign.integrations.hf import forward_head_input
from lenalign.losses import split_pairs
from lenalign.train.data import TokenizedPair, collate_pairs

VOCAB = 300
PAIRS = 4  # split 2 and 2 over the ranks
WORLD = 2
LEARNING_RATE = 0.5
STEPS = 3  # of the loop with a reference model
# fp32, relative to each tensor's largest element; measured below 1e-6
RELATIVE = 1e-5
TIMEOUT = 120.0


def build_model(seed: int, tied: bool) -> LlamaForCausalLM:
    """A 2-layer, 32-wide Llama over 300 tokens, random weights from ``seed``."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def make_pairs(seed: int) -> list[TokenizedPair]:
    """PAIRS pairs of different prompt and completion lengths (the batches are padded)."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=generator).tolist()

    pairs = []
    for i in range(PAIRS):
        prompt = tokens(3 + i)
        pairs.append(TokenizedPair(prompt + tokens(4 + i), prompt + tokens(7 - i), len(prompt)))
    return pairs


def shard(pairs: list[TokenizedPair], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """The collated batch of the rank's contiguous, equal share of the pairs."""
    size = len(pairs) // world_size
    return collate_pairs(pairs[rank * size : (rank + 1) * size], pad_token_id=0)


def pair_loss(logps) -> torch.Tensor:
    """A reference-free preference loss: the mean over the batch's pairs."""
    chosen, rejected = split_pairs(logps)
    return preference_loss(
        chosen, rejected, loss_type="simpo", beta=2.0, gamma=0.5, length_normalization="mean"
    ).loss


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor``, a DTensor's shards gathered."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def parameters_and_gradients(model: torch.nn.Module) -> tuple[dict, dict]:
    """Every parameter, and its gradient, by name, whole."""
    named = dict(model.named_parameters())
    return (
        {name: whole(p) for name, p in named.items()},
        {name: whole(p.grad) for name, p in named.items() if p.grad is not None},
    )


def single_process_step(tied: bool) -> dict:
    """The loss of the whole batch, its gradients and the parameters after one SGD step."""
    model = build_model(seed=0, tied=tied)
    batch = collate_pairs(make_pairs(seed=1), pad_token_id=0)
    head = forward_head_input(model, batch)
    logps = linear_sequence_logprobs(
        head.hidden,
        head.weight,
        batch["input_ids"],
        batch["completion_mask"],
        bias=head.bias,
        shift=True,
        **head.transform,
    )
    loss = pair_loss(logps)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LEARNING_RATE).step()
    parameters, gradients = parameters_and_gradients(model)
    return {"loss": loss.item(), "parameters": parameters, "gradients": gradients}


def mean_over_ranks(value: torch.Tensor) -> float:
    total = value.detach().clone()
    torch.distributed.all_reduce(total)  # a sum
    return total.item() / torch.distributed.get_world_size()


# How fully_shard is applied around the head, each after fully_shard on every decoder
# layer and before fully_shard on the model (the root):
LAYOUTS = {
    "root-owns-head": False,  # nothing more: the root owns embeddings, norm and the tied head
    "head-own-unit": True,  # an untied head sharded on its own
    "tied-head-group": True,  # fully_shard([embed_tokens, lm_head]): one unit, tied weight
}


def fsdp_step(rank: int, world_size: int, layout: str) -> dict:
    """fully_shard the model as ``layout`` says; one step through causal_lm_logprobs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    model = build_model(seed=0, tied=layout != "head-own-unit")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout == "head-own-unit":
        fully_shard(model.lm_head, mesh=mesh)
    elif layout == "tied-head-group":
        fully_shard([model.model.embed_tokens, model.lm_head], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    batch = shard(make_pairs(seed=1), rank, world_size)

    logps = causal_lm_logprobs(model, batch)
    # a head outside the root unit is resharded after its forward: the backward, which
    # reads the weight again, must gather it again
    resharded = isinstance(model.lm_head.weight, DTensor)
    loss = pair_loss(logps)
    loss.backward()
    gradients = parameters_and_gradients(model)[1]
    optimizer.step()
    return {
        "loss": mean_over_ranks(loss),
        "head_resharded_before_backward": resharded,
        "parameters": parameters_and_gradients(model)[0],
        "gradients": gradients,
    }


def reference_loop(model: torch.nn.Module, reference: torch.nn.Module, batches) -> dict:
    """STEPS SGD steps of a DPO loss, the reference scored under no_grad each step."""
    from torch.distributed.tensor import DTensor

    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    losses, reference_resharded = [], []
    for batch in batches:
        with torch.no_grad():
            ref_chosen, ref_rejected = split_pairs(causal_lm_logprobs(reference, batch))
        reference_resharded.append(isinstance(reference.lm_head.weight, DTensor))
        chosen, rejected = split_pairs(causal_lm_logprobs(model, batch))
        loss = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return {
        "losses": losses,
        "reference_resharded": reference_resharded,
        "parameters": parameters_and_gradients(model)[0],
    }


def single_process_loop() -> dict:
    model, reference = build_model(seed=0, tied=True), build_model(seed=2, tied=True)
    batch = collate_pairs(make_pairs(seed=1), pad_token_id=0)
    result = reference_loop(model, reference.requires_grad_(False), [batch] * STEPS)
    result["losses"] = [loss.item() for loss in result["losses"]]
    return result


def fsdp_loop(rank: int, world_size: int) -> dict:
    """The policy sharded as usual, the frozen reference with a resharding root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model, reference = build_model(seed=0, tied=True), build_model(seed=2, tied=True)
    reference.requires_grad_(False)
    for module in (model, reference):
        for layer in module.model.layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # no backward reshards a no-grad root: ask for it after the forward
    fully_shard(reference, mesh=mesh, reshard_after_forward=True)
    batch = shard(make_pairs(seed=1), rank, world_size)
    result = reference_loop(model, reference, [batch] * STEPS)
    result["losses"] = [mean_over_ranks(loss) for loss in result["losses"]]
    return result


def outcome(call) -> dict:
    """What ``call()`` raised: its type's name and its message."""
    try:
        call()
    except Exception as error:
        return {"kind": type(error).__name__, "message": str(error)}
    return {"kind": "no error", "message": ""}


def ddp_step(rank: int, world_size: int) -> dict:
    """DistributedDataParallel(CausalLMLogProbs(model)), called on the rank's batch."""
    from torch.nn.parallel import DistributedDataParallel

    model = build_model(seed=0, tied=True)
    policy = DistributedDataParallel(CausalLMLogProbs(model))
    optimizer = torch.optim.SGD(policy.parameters(), lr=LEARNING_RATE)
    batch = shard(make_pairs(seed=1), rank, world_size)

    # the DDP wrapper itself is refused: calling through it would skip DDP's forward
    refusal = outcome(lambda: causal_lm_logprobs(policy, batch))
    loss = pair_loss(policy(batch))
    loss.backward()
    gradients = parameters_and_gradients(model)[1]
    optimizer.step()
    return {
        "loss": mean_over_ranks(loss),
        "refusal": refusal,
        "parameters": parameters_and_gradients(model)[0],
        "gradients": gradients,
    }


def sharded_weights(rank: int, world_size: int) -> dict:
    """The unsupported ways: the sharded weight passed as it is, outside any forward, and
    a model whose head a unit wrapping the model shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model = build_model(seed=0, tied=False)
    fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    wrapper = CausalLMLogProbs(build_model(seed=0, tied=True))
    fully_shard(wrapper, mesh=mesh)
    batch = shard(make_pairs(seed=1), rank, world_size)
    labels, mask = batch["input_ids"], batch["completion_mask"]
    hidden = torch.randn(*labels.shape, 32)
    return {
        "raw": outcome(lambda: linear_sequence_logprobs(hidden, model.lm_head.weight, labels)),
        "outer unit": outcome(lambda: head_logprobs(wrapper.model, hidden, labels, mask)),
    }


SCENARIOS = {
    **{f"fsdp2 {layout}": partial(fsdp_step, layout=layout) for layout in LAYOUTS},
    "fsdp2 loop": fsdp_loop,
    "ddp": ddp_step,
    "sharded weights": sharded_weights,
}


def every_scenario(rank: int, world_size: int) -> dict[str, dict]:
    """All the scenarios in one world (starting one costs seconds of imports); a
    scenario that raises returns its traceback, failing its own test only."""
    results = {}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = scenario(rank, world_size)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        # the same order of collectives on every rank, whatever a scenario did
        torch.distributed.barrier()
    return results


@pytest.fixture(scope="module")
def world() -> list[dict[str, dict]]:
    """The scenarios' results, by rank."""
    return run_world(every_scenario, WORLD, timeout=TIMEOUT)


def results_of(world: list[dict[str, dict]], scenario: str) -> list[dict]:
    results = [by_scenario[scenario] for by_scenario in world]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
    return results


def assert_close_to(got: torch.Tensor, expected: torch.Tensor, where: tuple) -> None:
    """Equal within RELATIVE of the expected tensor's largest element."""
    scale = expected.abs().max().item()
    assert scale > 0, where  # every parameter takes part in the loss
    error = (got - expected).abs().max().item()
    assert error <= RELATIVE * scale, (*where, error / scale)


def assert_same_step(results: list[dict], single: dict) -> None:
    """Each rank's loss, whole gradients and parameters equal the single-process ones."""
    for rank, result in enumerate(results):
        assert result["loss"] == pytest.approx(single["loss"], rel=RELATIVE), rank
        for field in ("gradients", "parameters"):
            assert result[field].keys() == single[field].keys(), (rank, field)
            for name, expected in single[field].items():
                assert_close_to(result[field][name], expected, (rank, field, name))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fsdp2_step_equals_a_single_process_step(world, layout):
    results = results_of(world, f"fsdp2 {layout}")
    assert_same_step(results, single_process_step(tied=layout != "head-own-unit"))
    assert all(r["head_resharded_before_backward"] is LAYOUTS[layout] for r in results)


def test_fsdp2_steps_with_a_frozen_reference_equal_single_process_steps(world):
    single = single_process_loop()
    for rank, result in enumerate(results_of(world, "fsdp2 loop")):
        assert result["losses"] == pytest.approx(single["losses"], rel=RELATIVE), rank
        assert all(result["reference_resharded"]), rank
        for name, expected in single["parameters"].items():
            assert_close_to(result["parameters"][name], expected, (rank, name))


def test_ddp_step_equals_a_single_process_step(world):
    results = results_of(world, "ddp")
    assert_same_step(results, single_process_step(tied=True))
    for result in results:
        assert result["refusal"]["kind"] == "ValueError", result["refusal"]
        assert result["refusal"]["message"].startswith("model:")
        assert "CausalLMLogProbs" in result["refusal"]["message"]


def test_a_sharded_weight_outside_its_forward_is_refused_naming_weight(world):
    for by_case in results_of(world, "sharded weights"):
        result = by_case["raw"]
        assert result["kind"] == "ValueError", f"{result['kind']}: {result['message']}"
        assert result["message"].startswith("weight:"), result["message"]


def test_head_logprobs_refuses_a_head_sharded_from_outside_the_model(world):
    for by_case in results_of(world, "sharded weights"):
        result = by_case["outer unit"]
        assert result["kind"] == "ValueError", f"{result['kind']}: {result['message']}"
        assert result["message"].startswith("weight: expected the LM head's parameter")
        assert "no FSDP unit inside the model" in result["message"]


# single process: the same helpers on an unsharded model are the plain fused head


def test_on_a_plain_model_the_helpers_are_the_single_process_fused_head():
    model = build_model(seed=0, tied=True)
    batch = collate_pairs(make_pairs(seed=1), pad_token_id=0)
    head = forward_head_input(model, batch)
    expected = linear_sequence_logprobs(
        head.hidden, head.weight, batch["input_ids"], batch["completion_mask"], shift=True
    )
    assert owning_unit(model, model.lm_head) is None
    for got in (
        causal_lm_logprobs(model, batch),
        CausalLMLogProbs(model)(batch),
        head_logprobs(model, head.hidden, batch["input_ids"], batch["completion_mask"], shift=True),
    ):
        torch.testing.assert_close(got.sum, expected.sum, rtol=0, atol=0)
        torch.testing.assert_close(got.count, expected.count, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bias", "logit_scale", "logit_softcap"])
def test_head_logprobs_refuses_what_the_model_provides(name):
    model = build_model(seed=0, tied=True)
    hidden, labels = torch.zeros(1, 3, 32), torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=f"^{name}: expected no value"):
        head_logprobs(model, hidden, labels, **{name: 1.0})


def test_causal_lm_logprobs_refuses_a_batch_without_the_completion_mask():
    model = build_model(seed=0, tied=True)
    batch = collate_pairs(make_pairs(seed=1), pad_token_id=0)
    del batch["completion_mask"]
    with pytest.raises(ValueError, match=r"^batch: expected .*completion_mask"):
        causal_lm_logprobs(model, batch)
