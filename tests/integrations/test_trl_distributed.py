"""lenalign's TRL trainers under DDP: 2 CPU processes (gloo on 127.0.0.1) train as one does.

One torchrun launch of trl_ddp_run.py trains, on each of its 2 ranks, 2 rows per rank
and step: LenalignDPOTrainer with "sum" (DDP walking the outputs for unused parameters,
the Trainer's default without gradient checkpointing, and not), with "mean", and TRL's
own DPOTrainer with "sum"; LenalignKTOTrainer and KTOTrainer with "sum", and
LenalignKTOTrainer with "mean" (loss type apo_zero_unpaired); LenalignSFTTrainer and
SFTTrainer with "token", and LenalignSFTTrainer with "sequence"; LenalignGRPOTrainer and
GRPOTrainer, LenalignRLOOTrainer and RLOOTrainer (1 prompt x 2 sampled completions per
rank and step, a reference model). The truth is the
single-process run of the same global batch (4 rows a step), in this process, or TRL's
trainer under the same DDP: KTO's KL estimate pairs the completions within each
per-device batch, so its "kto" loss is not the single process's.

Why they must agree: accelerate seeds the sampler alike in every process and deals the
per-device batches of that one order out in turn (rank r takes batches r, r + 2, ...),
so the global batch of a step is the single process's batch; every loss type is a mean
over pairs, DDP averages the gradients of equal halves, and the logged metrics are
gathered over the ranks. So the loss curve, every logged metric and the weights after 3
SGD steps agree within float32 rounding, and both ranks hold the same weights. A run
whose head escaped DDP's gradient hooks would leave each rank with its own half's
update, and one that accelerate ran undistributed (no ``use_cpu`` on a machine without
an accelerator) would train 2 independent runs; either fails here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import run_bounded, torchrun_command
from trl_ddp_run import build
from trl_helpers import assert_close_metrics

WORLD = 2
PER_RANK = 2
# 3 global batches of WORLD * PER_RANK rows: the 3 steps are one epoch
N_ROWS = 12
# without use_cpu, accelerate on a machine without an accelerator reads torchrun's
# environment as no distribution at all; use_cpu makes it MULTI_CPU, and gloo is named
# rather than left to accelerate's choice (mpi where torch has it). Not in one process:
# there accelerate 1.15 takes a named backend for a process group it has not created
SINGLE = {"use_cpu": True}
DISTRIBUTED = {**SINGLE, "ddp_backend": "gloo"}
KTO_MEAN = {"length_normalization": "mean", "loss_type": "apo_zero_unpaired"}
# name -> (kind, trainer, fields beyond trl_helpers.config_kwargs)
RUNS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "lenalign-sum": ("dpo", "lenalign", {}),
    "lenalign-sum-static": ("dpo", "lenalign", {"ddp_find_unused_parameters": False}),
    "lenalign-mean": ("dpo", "lenalign", {"length_normalization": "mean"}),
    "trl-sum": ("dpo", "trl", {}),
    "kto-lenalign-sum": ("kto", "lenalign", {}),
    "kto-trl-sum": ("kto", "trl", {}),
    "kto-lenalign-mean": ("kto", "lenalign", KTO_MEAN),
    "sft-lenalign-token": ("sft", "lenalign", {}),
    "sft-trl-token": ("sft", "trl", {}),
    "sft-lenalign-sequence": ("sft", "lenalign", {"length_normalization": "sequence"}),
    # 1 prompt x 2 completions per rank and step; the reference built from the policy's
    # path (RLOO's default beta, 0.05)
    "grpo-lenalign": ("grpo", "lenalign", {"beta": 0.04}),
    "grpo-trl": ("grpo", "trl", {"beta": 0.04}),
    "rloo-lenalign": ("rloo", "lenalign", {}),
    "rloo-trl": ("rloo", "trl", {}),
}
# the runs whose truth is a single process on the global batch
SINGLE_RUNS = ("lenalign-sum", "lenalign-mean", "kto-lenalign-mean", "sft-lenalign-sequence")
# the loss curve is held to float32 rounding; the other metrics and the weights to
# trl_helpers' RTOL (rewards near 0 at the first step are differences of sums)
LOSS_RTOL = 1e-5
# GRPO's and RLOO's losses are near 0 at a ratio of 1 (their advantages average to 0)
LOSS_ATOL = 1e-7
PARAMETER_RTOL, PARAMETER_ATOL = 1e-4, 1e-6
# the FLOP estimate counts each rank's padded tokens, and a half batch pads to its own
# longest sequence: it is not a property of the training
NOT_COMPARED = ("total_flos",)
SCRIPT = Path(__file__).with_name("trl_ddp_run.py")
# 2 interpreters importing torch, transformers and TRL on 2 cores (about 20 s), then a
# few seconds per run; a hung collective is killed here rather than by gloo's 30 min
LAUNCH_TIMEOUT_S = 180


def torchrun(root: Path) -> str:
    """Launch trl_ddp_run.py on WORLD ranks with RUNS; its output. A launch that fails
    or outlives LAUNCH_TIMEOUT_S (killed with its ranks) fails the test."""
    plan = root / "plan.json"
    runs = [
        {
            "name": name,
            "kind": kind,
            "trainer": trainer,
            "overrides": {"per_device_train_batch_size": PER_RANK, **overrides, **DISTRIBUTED},
        }
        for name, (kind, trainer, overrides) in RUNS.items()
    ]
    plan.write_text(json.dumps({"out": str(root), "n_rows": N_ROWS, "runs": runs}))
    launch = run_bounded(torchrun_command(WORLD, str(SCRIPT), str(plan)), LAUNCH_TIMEOUT_S)
    assert launch.returncode == 0, launch.stdout[-6000:]
    return launch.stdout


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """name -> what each rank wrote (rank order) for every run of RUNS."""
    root = tmp_path_factory.mktemp("ddp")
    started = time.monotonic()
    torchrun(root)
    print(f"torchrun launch: {time.monotonic() - started:.1f} s")
    return {
        name: [torch.load(root / f"{name}-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
        for name in RUNS
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The single-process runs of the global batch, in this process: name -> result."""
    root = tmp_path_factory.mktemp("single")
    results = {}
    for name in SINGLE_RUNS:
        kind, trainer, overrides = RUNS[name]
        overrides = {**overrides, **SINGLE, "per_device_train_batch_size": WORLD * PER_RANK}
        run = build(kind, trainer, root / name, N_ROWS, overrides)
        run.train()
        results[name] = {
            "state_dict": run.model.state_dict(),
            "log_history": run.state.log_history,
        }
    return results


def assert_same_training(expected: dict[str, Any], got: dict[str, Any]) -> None:
    """The same loss curve (LOSS_RTOL), logged metrics and final weights."""
    expected_log, got_log = expected["log_history"], got["log_history"]
    assert len(expected_log) == len(got_log)
    for expected_entry, got_entry in zip(expected_log, got_log, strict=True):
        assert_close_metrics(expected_entry, got_entry, skip=NOT_COMPARED)
        if "loss" in expected_entry:
            assert math.isclose(
                expected_entry["loss"], got_entry["loss"], rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL
            )
    losses = [entry["loss"] for entry in expected_log if "loss" in entry]
    assert len(losses) == 3
    expected_weights, got_weights = expected["state_dict"], got["state_dict"]
    assert expected_weights.keys() == got_weights.keys()
    for name, weight in expected_weights.items():
        torch.testing.assert_close(
            got_weights[name],
            weight,
            rtol=PARAMETER_RTOL,
            atol=PARAMETER_ATOL,
            msg=lambda message, name=name: f"{name}: {message}",
        )


@pytest.mark.parametrize("name", RUNS)
def test_runs_are_ddp_over_gloo(launched, name):
    """Every run was one DDP group of 2 over gloo, and its ranks end with equal weights
    (DDP averages the gradients, so the ranks take the same step)."""
    ranks = launched[name]
    for rank, result in enumerate(ranks):
        assert result["rank"] == rank
        assert result["world_size"] == WORLD
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["backend"] == "gloo"
        assert result["wrapper"] == "DistributedDataParallel"
        expected_find_unused = RUNS[name][2].get("ddp_find_unused_parameters", True)
        assert result["find_unused_parameters"] is expected_find_unused
    for key, weight in ranks[0]["state_dict"].items():
        assert torch.equal(ranks[1]["state_dict"][key], weight), key
    # and the weights moved: a run that trained nothing would agree with anything
    assert ranks[0]["log_history"][0]["grad_norm"] > 0


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("lenalign-sum", "lenalign-sum"),
        ("lenalign-sum-static", "lenalign-sum"),
        ("lenalign-mean", "lenalign-mean"),
        ("kto-lenalign-mean", "kto-lenalign-mean"),
        ("sft-lenalign-sequence", "sft-lenalign-sequence"),
    ],
)
def test_ddp_trains_as_one_process(launched, single, name, reference):
    """2 ranks of 2 rows a step train as 1 process of 4: loss curve, metrics, weights."""
    assert_same_training(single[reference], launched[name][0])


@pytest.mark.parametrize(
    ("trl_run", "lenalign_run"),
    [
        ("trl-sum", "lenalign-sum"),
        ("kto-trl-sum", "kto-lenalign-sum"),
        ("sft-trl-token", "sft-lenalign-token"),
        ("grpo-trl", "grpo-lenalign"),
        ("rloo-trl", "rloo-lenalign"),
    ],
)
def test_ddp_reproduces_trl_trainer_under_ddp(launched, trl_run, lenalign_run):
    """With the defaults, each lenalign trainer under DDP is TRL's under DDP."""
    assert_same_training(launched[trl_run][0], launched[lenalign_run][0])
