"""lenalign's DPO trainer on a tensor-parallel model: 2 CPU processes (gloo on 127.0.0.1),
the tiny Llama split by torch's own ``parallelize_module`` (attention and MLP by column
and row, the LM head by vocabulary row: ColwiseParallel, its weight a Shard(0) DTensor).

Both ranks take the whole batch (tensor parallelism without data parallelism; accelerate
on a CPU machine, without ``use_cpu``, deals out nothing), so 3 SGD steps on 2 ranks must
equal 3 steps of one process on the same untied model: loss curve, logged metrics and
final weights (gathered) within float32 rounding. LenalignDPOTrainer scores the head's
local rows vocab-parallel (``VocabShard.from_dtensor``); TRL's DPOTrainer on the same
split model gathers the whole head (``weight.full_tensor()``) and forms vocabulary-wide
logits, which the profiler sees and which serves as the check that it can see them.
LenalignGRPOTrainer samples its completions through the split model (the head's own
forward gathering its logits, as transformers' "colwise_rep") and scores them
vocab-parallel like the others.

accelerate's own tensor parallelism (``ParallelismConfig(tp_size=2)``, which transformers'
``tp_plan`` models require in the Trainer) refuses a CPU machine (``MULTI_CPU``), and with
it a data-parallel x tensor-parallel mesh through the Trainer: not run here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import run_bounded, run_world, torchrun_command
from test_trl_distributed import assert_same_training
from trl_ddp_run import build
from trl_helpers import (
    POLICY_SEED,
    REFERENCE_SEED,
    tensor_parallel,
    tiny_model,
    untied_tiny_model,
)

from lenalign.integrations.trl.head import HeadRequest, install_lenalign_head

WORLD = 2
BATCH = 2
N_ROWS = 6  # 3 steps of BATCH pairs
VOCAB_ROWS_LOCAL = (130, 129)  # the byte tokenizer's 259 ids over 2 ranks, as torch.chunk
# name -> (kind, trainer, fields beyond trl_helpers.config_kwargs)
RUNS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "tp-lenalign-sum": ("dpo", "lenalign", {}),
    "tp-lenalign-mean": ("dpo", "lenalign", {"length_normalization": "mean"}),
    "tp-lenalign-padding-free": ("dpo", "lenalign", {"padding_free": True}),
    "tp-trl-sum": ("dpo", "trl", {}),
    "tp-kto-lenalign-sum": ("kto", "lenalign", {}),
    "tp-sft-lenalign-token": ("sft", "lenalign", {}),
    # 1 prompt x 2 sampled completions a step, generation through the head's own forward
    "tp-grpo-lenalign": ("grpo", "lenalign", {"beta": 0.0}),
}
SCRIPT = Path(__file__).with_name("trl_ddp_run.py")
LAUNCH_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """name -> what each rank wrote (rank order) for every run of RUNS."""
    root = tmp_path_factory.mktemp("tp")
    runs = [
        {
            "name": name,
            "kind": kind,
            "trainer": trainer,
            "tensor_parallel": True,
            "overrides": {"per_device_train_batch_size": BATCH, **overrides},
        }
        for name, (kind, trainer, overrides) in RUNS.items()
    ]
    plan = root / "plan.json"
    plan.write_text(json.dumps({"out": str(root), "n_rows": N_ROWS, "runs": runs}))
    started = time.monotonic()
    launch = run_bounded(torchrun_command(WORLD, str(SCRIPT), str(plan)), LAUNCH_TIMEOUT_S)
    assert launch.returncode == 0, launch.stdout[-6000:]
    print(f"torchrun launch: {time.monotonic() - started:.1f} s")
    return {
        name: [torch.load(root / f"{name}-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
        for name in RUNS
    }


def single(tmp_path: Path, name: str) -> dict[str, Any]:
    """The run ``name`` in this process on the unsplit untied models."""
    kind, trainer, overrides = RUNS[name]
    run = build(
        kind,
        trainer,
        tmp_path / name,
        N_ROWS,
        {**overrides, "use_cpu": True, "per_device_train_batch_size": BATCH},
        model=untied_tiny_model(POLICY_SEED),
        ref_model=untied_tiny_model(REFERENCE_SEED),
    )
    run.train()
    return {"state_dict": run.model.state_dict(), "log_history": run.state.log_history}


def test_runs_are_tensor_parallel(launched):
    """Every run split the head over both ranks (and no DDP): the same weights after."""
    for name, ranks in launched.items():
        for rank, result in enumerate(ranks):
            assert result["head_split_by_row"], name
            assert result["head_local_rows"] == VOCAB_ROWS_LOCAL[rank], name
            assert result["wrapper"] != "DistributedDataParallel", name
        for key, weight in ranks[0]["state_dict"].items():
            torch.testing.assert_close(ranks[1]["state_dict"][key], weight, rtol=0, atol=0)
        assert ranks[0]["log_history"][0]["grad_norm"] > 0


@pytest.mark.parametrize("name", [name for name in RUNS if "lenalign" in name])
def test_tensor_parallel_trains_as_one_process(launched, tmp_path, name):
    assert_same_training(single(tmp_path, name), launched[name][0])


def test_lenalign_is_trl_under_tensor_parallelism(launched):
    assert_same_training(launched["tp-trl-sum"][0], launched["tp-lenalign-sum"][0])


def test_head_is_never_gathered(launched):
    """No op of lenalign's steps (inside its operators too) took a [*, V] tensor, and
    the head's local rows were what they projected onto; TRL's gathered head did form
    vocabulary-wide logits, which shows the profiler would see them. GRPO's generation
    runs the head's own forward, whose gathered logits are one position per row."""
    for name, ranks in launched.items():
        for result in ranks:
            if "grpo" in name:
                assert 0 < result["vocab_rows"] <= BATCH, name
                assert result["local_head_seen"], name
            elif "lenalign" in name:
                assert result["vocab_rows"] == 0, name
                assert result["local_head_seen"], name
            else:
                assert result["vocab_rows"] > 0, name


def test_untied_model_is_the_tied_one():
    """The untied model starts from the tests' tiny model: the same function."""
    tied, untied = tiny_model(POLICY_SEED), untied_tiny_model(POLICY_SEED)
    ids = torch.arange(12).reshape(2, 6)
    torch.testing.assert_close(untied(ids).logits, tied(ids).logits, rtol=0, atol=0)


def _head_scores(rank: int, world: int) -> dict[str, Any]:
    """The trainers' head forward on a head split two ways that look alike from the
    weight (a Shard(0) DTensor on a 1-D mesh): FSDP2's (the head a unit of its own, so
    still sharded inside the model's forward) and tensor parallelism's."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    scores = {}
    for layout in ("fsdp", "own rows", "tensor-parallel", "shared rows"):
        # data parallelism gives each rank its own rows; a tensor-parallel group, the same
        seed = 5 + (rank if layout in ("fsdp", "own rows") else 0)
        ids = torch.randint(3, 259, (2, 7), generator=torch.Generator().manual_seed(seed))
        labels = ids.clone()
        labels[:, :3] = -100
        model = untied_tiny_model(POLICY_SEED)
        if layout == "fsdp":
            fully_shard(model.lm_head)
            fully_shard(model)
        elif layout == "tensor-parallel":
            tensor_parallel(model, world)
        install_lenalign_head(model)
        logps = model(input_ids=ids, lenalign_head=HeadRequest(labels=labels)).logps
        logps.mean.sum().backward()
        grad = model.model.norm.weight.grad
        grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
        scores[layout] = (logps.sum.detach(), grad)
    return scores


def test_fsdp_head_is_gathered_and_tensor_parallel_head_is_not_confused_with_it():
    """Both splits score as one process (values, and a gradient through the backbone):
    FSDP2's head gathered, each rank on its own rows (taken for a vocabulary split, the
    ranks' differing hidden states would be refused), the tensor-parallel one
    vocab-parallel on the rows every rank shares."""
    ranks = run_world(_head_scores, WORLD, timeout=120)
    for scores in ranks:
        for want, have in zip(scores["shared rows"], scores["tensor-parallel"], strict=True):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
    # FSDP2 averages the backbone's gradient over the ranks: the values per rank, the
    # gradient against the mean of the ranks' single-process ones
    mean_grad = sum(scores["own rows"][1] for scores in ranks) / len(ranks)
    for rank, scores in enumerate(ranks):
        torch.testing.assert_close(scores["fsdp"][0], scores["own rows"][0])
        torch.testing.assert_close(scores["fsdp"][1], mean_grad, rtol=1e-5, atol=1e-6)
        assert not torch.equal(scores["fsdp"][0], ranks[1 - rank]["fsdp"][0])


def _two_dimensional_step(rank: int, world: int) -> dict[str, Any]:
    """One step of the head forward on a 2 x 2 mesh: data-parallel over "dp" (each
    replica its own 2 rows), the model split over "tp" (the head vocab-parallel within
    each replica); the gradients averaged over "dp" as data parallelism does. Also the
    single process on the 4 rows, for the truth."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 259, (4, 9), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100

    def step(model, rows: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        install_lenalign_head(model)
        request = HeadRequest(labels=labels[rows])
        logps = model(input_ids=ids[rows], lenalign_head=request).logps
        logps.mean.mean().backward()
        return logps.mean.detach(), dict(model.named_parameters())

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    replica = mesh.get_local_rank("dp")
    model = untied_tiny_model(POLICY_SEED)
    # tensor_parallel's 1-D mesh over the whole world is not this one: split by hand
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel()})
    means, parameters = step(model, slice(2 * replica, 2 * replica + 2))
    grads = {}
    for name, parameter in parameters.items():
        grad = parameter.grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        dist.all_reduce(local, group=mesh.get_group("dp"))  # the mean over the replicas
        local /= mesh.size(0)
        grads[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    _, truth = step(untied_tiny_model(POLICY_SEED), slice(0, 4))
    return {
        "means": means,
        "replica": replica,
        "grads": grads,
        "truth": {name: parameter.grad for name, parameter in truth.items()},
        "head_rows": parameters["lm_head.weight"].to_local().shape[0],
    }


def test_data_parallel_by_tensor_parallel_mesh_steps_as_one_process():
    """4 processes, 2 replicas x 2 vocabulary shards: each replica's scores and the
    averaged gradients of every parameter (head rows, and the backbone through the
    hidden states' reduced gradient) equal one process on the 4 rows."""
    ranks = run_world(_two_dimensional_step, 4, timeout=180)
    assert sorted(result["head_rows"] for result in ranks) == [129, 129, 130, 130]
    assert [result["replica"] for result in ranks] == [0, 0, 1, 1]
    assert not torch.equal(ranks[0]["means"], ranks[2]["means"])
    for result in ranks:
        for name, want in result["truth"].items():
            torch.testing.assert_close(
                result["grads"][name], want, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
            )
