"""lenalign's TRL trainers under DeepSpeed ZeRO-3 (and ZeRO-2): 2 CPU processes on gloo
(127.0.0.1), DeepSpeed's real engine with ``DS_ACCELERATOR=cpu``.

One torchrun launch of trl_ddp_run.py sets what ``accelerate launch`` sets from a
DeepSpeed config (``ACCELERATE_USE_DEEPSPEED``, and per run the config file), float32,
no ``use_cpu`` (with it accelerate drops DeepSpeed). The ZeRO-3 config keeps no
parameter whole (``stage3_param_persistence_threshold`` 0: by default parameters under
1e5 elements stay whole on every rank, the tiny model's head among them, and the test
would prove nothing), so the LM head is partitioned between the ranks outside a forward.
lenalign reads ``lm_head.weight`` inside the model's forward without calling the head
module; DeepSpeed then gathers it as an external parameter of the model, releases it
when the forward ends and gathers it again for the backward, where lenalign's op reads
it. Each lenalign trainer must train as TRL's own does under the same config (DPO with
its head tied to the embedding and untied, padding-free, KTO, SFT, GRPO, RLOO), and the
"mean" DPO run as one
process on the global batch: loss curve, logged metrics and final weights (gathered)
within float32 rounding. A backward that read the partitioned (empty) weight would fail
on its shape; one whose head gradient missed ZeRO-3's reduction would leave the head
where it started.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import run_bounded, run_world, torchrun_command
from test_trl_distributed import assert_same_training
from trl_ddp_run import build
from trl_helpers import POLICY_SEED, untied_tiny_model

from lenalign.integrations.trl.head import HeadRequest, install_lenalign_head

# found, not imported: DeepSpeed is imported in the launched processes only, after
# DS_ACCELERATOR is set, and this process's other tests run without it
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip(
        "DeepSpeed is not installed (make test installs it: the deepspeed extra)",
        allow_module_level=True,
    )

WORLD = 2
PER_RANK = 2
N_ROWS = 12  # 3 global batches of WORLD * PER_RANK rows
# name -> (ZeRO stage, kind, trainer, fields beyond trl_helpers.config_kwargs, untied);
# GRPO (beta 0.04) and RLOO (its default 0.05) with a reference built from the policy's path
RUNS: dict[str, tuple[int, str, str, dict[str, Any], bool]] = {
    "zero3-lenalign-sum": (3, "dpo", "lenalign", {}, False),
    "zero3-trl-sum": (3, "dpo", "trl", {}, False),
    "zero3-lenalign-mean": (3, "dpo", "lenalign", {"length_normalization": "mean"}, False),
    "zero3-lenalign-padding-free": (3, "dpo", "lenalign", {"padding_free": True}, False),
    "zero3-untied-lenalign-sum": (3, "dpo", "lenalign", {}, True),
    "zero3-untied-trl-sum": (3, "dpo", "trl", {}, True),
    "zero3-kto-lenalign-sum": (3, "kto", "lenalign", {}, False),
    "zero3-kto-trl-sum": (3, "kto", "trl", {}, False),
    "zero3-sft-lenalign-token": (3, "sft", "lenalign", {}, False),
    "zero3-sft-trl-token": (3, "sft", "trl", {}, False),
    "zero3-grpo-lenalign": (3, "grpo", "lenalign", {"beta": 0.04}, False),
    "zero3-grpo-trl": (3, "grpo", "trl", {"beta": 0.04}, False),
    "zero3-rloo-lenalign": (3, "rloo", "lenalign", {}, False),
    "zero3-rloo-trl": (3, "rloo", "trl", {}, False),
    "zero2-lenalign-sum": (2, "dpo", "lenalign", {}, False),
    "zero2-trl-sum": (2, "dpo", "trl", {}, False),
}
SCRIPT = Path(__file__).with_name("trl_ddp_run.py")
# 2 interpreters importing torch, transformers, TRL and DeepSpeed on 2 cores, then a few
# seconds per run; a hung collective is killed here rather than by gloo's 30 min
LAUNCH_TIMEOUT_S = 240


def deepspeed_config(stage: int) -> dict[str, Any]:
    """A ZeRO config of ``stage`` whose batch sizes accelerate fills in from the trainer's
    ("auto"), with the trainer's own SGD optimizer."""
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_allow_untested_optimizer": True,
    }


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """name -> what each rank wrote (rank order) for every run of RUNS."""
    root = tmp_path_factory.mktemp("deepspeed")
    configs = {}
    for stage in (2, 3):
        configs[stage] = root / f"zero{stage}.json"
        configs[stage].write_text(json.dumps(deepspeed_config(stage)))
    runs = [
        {
            "name": name,
            "kind": kind,
            "trainer": trainer,
            "deepspeed": str(configs[stage]),
            "untied": untied,
            "overrides": {
                "per_device_train_batch_size": PER_RANK,
                "ddp_backend": "gloo",
                **overrides,
            },
        }
        for name, (stage, kind, trainer, overrides, untied) in RUNS.items()
    ]
    plan = root / "plan.json"
    plan.write_text(json.dumps({"out": str(root), "n_rows": N_ROWS, "runs": runs}))
    environment = {"ACCELERATE_USE_DEEPSPEED": "true", "DS_ACCELERATOR": "cpu"}
    started = time.monotonic()
    command = torchrun_command(WORLD, str(SCRIPT), str(plan))
    launch = run_bounded(command, LAUNCH_TIMEOUT_S, environment)
    assert launch.returncode == 0, launch.stdout[-6000:]
    print(f"torchrun launch: {time.monotonic() - started:.1f} s")
    return {
        name: [torch.load(root / f"{name}-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
        for name in RUNS
    }


def test_runs_are_deepspeed_with_the_head_partitioned(launched):
    """Every run trained through DeepSpeed's engine at its stage on 2 gloo ranks, under
    ZeRO-3 with the LM head partitioned between them; the ranks end with equal weights."""
    for name, ranks in launched.items():
        stage = RUNS[name][0]
        for rank, result in enumerate(ranks):
            assert result["rank"] == rank
            assert result["world_size"] == WORLD
            assert result["distributed_type"] == "DistributedType.DEEPSPEED", name
            assert result["backend"] == "gloo"
            assert result["wrapper"] == "DeepSpeedEngine", name
            assert result["zero_stage"] == stage, name
            assert result["head_partitioned"] is (stage == 3), name
        for key, weight in ranks[0]["state_dict"].items():
            assert torch.equal(ranks[1]["state_dict"][key], weight), (name, key)
        assert ranks[0]["log_history"][0]["grad_norm"] > 0, name


@pytest.mark.parametrize(
    ("trl_run", "lenalign_run"),
    [
        ("zero3-trl-sum", "zero3-lenalign-sum"),
        ("zero3-trl-sum", "zero3-lenalign-padding-free"),
        ("zero3-untied-trl-sum", "zero3-untied-lenalign-sum"),
        ("zero3-kto-trl-sum", "zero3-kto-lenalign-sum"),
        ("zero3-sft-trl-token", "zero3-sft-lenalign-token"),
        ("zero3-grpo-trl", "zero3-grpo-lenalign"),
        ("zero3-rloo-trl", "zero3-rloo-lenalign"),
        ("zero2-trl-sum", "zero2-lenalign-sum"),
    ],
)
def test_reproduces_trl_trainer_under_deepspeed(launched, trl_run, lenalign_run):
    """With the defaults, each lenalign trainer under ZeRO is TRL's under the same ZeRO."""
    assert_same_training(launched[trl_run][0], launched[lenalign_run][0])


def test_zero3_trains_as_one_process(launched, tmp_path):
    """ZeRO-3 on 2 ranks of 2 rows a step trains as 1 process of 4 ("mean")."""
    _, kind, trainer, overrides, _ = RUNS["zero3-lenalign-mean"]
    overrides = {**overrides, "use_cpu": True, "per_device_train_batch_size": WORLD * PER_RANK}
    run = build(kind, trainer, tmp_path / "single", N_ROWS, overrides)
    run.train()
    expected = {"state_dict": run.model.state_dict(), "log_history": run.state.log_history}
    assert_same_training(expected, launched["zero3-lenalign-mean"][0])


def test_the_head_moved_under_zero3(launched):
    """The untied head's weight trained (its gradient reached ZeRO-3's reduction), by as
    much as TRL's; a gradient lost between the gathered op and the partitioned parameter
    would leave it as it started."""
    start = untied_tiny_model(POLICY_SEED).lm_head.weight.detach()
    for name in ("zero3-untied-lenalign-sum", "zero3-untied-trl-sum"):
        trained = launched[name][0]["state_dict"]["lm_head.weight"]
        assert not torch.allclose(trained, start), name


def _head_outside_the_engine(rank: int, world_size: int) -> dict[str, Any]:
    """On one ZeRO-3 rank: the installed forward's loss and the full gradients of the
    untied head and the embedding, called through the engine and on the module directly
    (as a trainer calling an unwrapped model does), and whether the head was partitioned
    between the forward and the backward, and after."""
    os.environ.update(
        DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    generator = torch.Generator().manual_seed(rank)  # each rank its own rows
    input_ids = torch.randint(3, 259, (2, 9), generator=generator)
    labels = input_ids.masked_fill(torch.arange(9) < 3, -100)
    results = {}
    for route in ("engine", "module"):
        model = install_lenalign_head(untied_tiny_model(POLICY_SEED))
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            config={**deepspeed_config(3), "train_micro_batch_size_per_gpu": 2,
                    "train_batch_size": 2 * world_size, "gradient_accumulation_steps": 1},
        )  # fmt: skip
        head = engine.module.lm_head.weight
        call = engine if route == "engine" else engine.module
        logps = call(input_ids=input_ids, lenalign_head=HeadRequest(labels)).logps
        partitioned_between = head.numel() == 0
        loss = (logps.sum * torch.tensor([1.0, -0.5])).sum()
        engine.backward(loss)
        results[route] = {
            "loss": loss.detach(),
            "partitioned": (partitioned_between, head.numel() == 0),
            "grads": {
                name: safe_get_full_grad(param).clone()
                for name, param in engine.module.named_parameters()
                if name in ("lm_head.weight", "model.embed_tokens.weight")
            },
        }
    return results


def test_head_partitioned_outside_the_forward_and_backward():
    """Through DeepSpeed's engine or on the module itself, the whole head exists on a rank
    only inside the forward and the backward (partitioned between them and after), and
    the gradients that reach ZeRO-3 are the same, non-zero, on each of 2 ranks."""
    for ranks in run_world(_head_outside_the_engine, WORLD):
        engine, module = ranks["engine"], ranks["module"]
        torch.testing.assert_close(module["loss"], engine["loss"], rtol=0, atol=0)
        assert engine["partitioned"] == module["partitioned"] == (True, True)
        for name, grad in engine["grads"].items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(module["grads"][name], grad, rtol=1e-6, atol=1e-7)
