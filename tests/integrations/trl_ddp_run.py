"""One rank of a torchrun launch of TRL trainers and their lenalign switches on the tiny
models (for test_trl_distributed.py).

``python -m torch.distributed.run --nproc-per-node N trl_ddp_run.py PLAN`` where PLAN is
a JSON file ``{"out": DIR, "n_rows": N, "runs": [{"name", "kind", "trainer",
"overrides"}, ...]}``: each rank
trains every run in turn (one launch pays the imports of torch, transformers and TRL
once for all of them) and writes ``DIR/<name>-rank<r>.pt`` with its final parameters,
its log history and what the run was actually distributed over, so that the test can
tell a real DDP run from N independent single-process ones.

``trainer`` is "lenalign" or "trl", ``kind`` "dpo" (the default), "kto", "sft", "grpo"
or "rloo": LenalignDPOTrainer or TRL's DPOTrainer, and so on; ``overrides`` are the
config's fields on top of trl_helpers.config_kwargs. ``n_rows`` rows of the kind's data
set (preference pairs, unpaired completions, texts, prompts). ``"tensor_parallel":
true`` trains the untied tiny models split over the launch's ranks by
``trl_helpers.tensor_parallel`` instead, under the profiler, and records the head's
placement and the vocabulary-wide tensors the ops took; ``"untied": true`` trains the
untied tiny models unsplit. ``"deepspeed": PATH``
names the run's DeepSpeed config file, as ``accelerate launch`` does (the launch sets
``ACCELERATE_USE_DEEPSPEED`` and ``DS_ACCELERATOR``); the run records its ZeRO stage,
whether the head was partitioned, and its parameters gathered whole.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rl_helpers import make_rl, prompt_dataset, saved_tiny_model
from torch.distributed.tensor import DTensor, Shard
from torch.profiler import ProfilerActivity, profile
from trl import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    RLOOConfig,
    RLOOTrainer,
    SFTConfig,
    SFTTrainer,
)
from trl_helpers import (
    POLICY_SEED,
    REFERENCE_SEED,
    make_kto,
    make_sft,
    make_trainer,
    preference_dataset,
    profiled_vocab_rows,
    tensor_parallel,
    text_dataset,
    unpaired_dataset,
    untied_tiny_model,
)

from lenalign.integrations.trl import (
    LenalignDPOConfig,
    LenalignDPOTrainer,
    LenalignGRPOConfig,
    LenalignGRPOTrainer,
    LenalignKTOConfig,
    LenalignKTOTrainer,
    LenalignRLOOConfig,
    LenalignRLOOTrainer,
    LenalignSFTConfig,
    LenalignSFTTrainer,
)

# kind -> {trainer: (trainer class, config class)}
TRAINERS = {
    "dpo": {"lenalign": (LenalignDPOTrainer, LenalignDPOConfig), "trl": (DPOTrainer, DPOConfig)},
    "kto": {"lenalign": (LenalignKTOTrainer, LenalignKTOConfig), "trl": (KTOTrainer, KTOConfig)},
    "sft": {"lenalign": (LenalignSFTTrainer, LenalignSFTConfig), "trl": (SFTTrainer, SFTConfig)},
    "grpo": {
        "lenalign": (LenalignGRPOTrainer, LenalignGRPOConfig),
        "trl": (GRPOTrainer, GRPOConfig),
    },
    "rloo": {
        "lenalign": (LenalignRLOOTrainer, LenalignRLOOConfig),
        "trl": (RLOOTrainer, RLOOConfig),
    },
}


def build(
    kind: str,
    trainer: str,
    output_dir: Path,
    n_rows: int,
    overrides: dict[str, Any],
    **models: Any,
):
    """The trainer of ``kind`` on ``n_rows`` rows of its tiny data set (on ``models``,
    ``model=`` and ``ref_model=``, where given; SFT has no reference)."""
    classes = TRAINERS[kind][trainer]
    if kind in ("grpo", "rloo"):
        policy = models.get("model")
        # RLOO's default beta (a config class attribute) is not 0
        if policy is None and overrides.get("beta", classes[1].beta) != 0.0:
            policy = saved_policy(output_dir.parent / f"{output_dir.name}-policy")
        dataset = prompt_dataset(n_rows)
        return make_rl(*classes, output_dir, model=policy, dataset=dataset, **overrides)
    if "model" in models and kind != "dpo":
        policy = models["model"]
        models = {**models, "model": lambda: policy}  # SFT's and KTO's builders take a builder
    if kind == "sft":
        models.pop("ref_model", None)
    if kind == "kto":
        dataset = unpaired_dataset(n_rows)
        return make_kto(*classes, output_dir, dataset=dataset, **models, **overrides)
    if kind == "sft":
        dataset = text_dataset(n_rows)
        return make_sft(*classes, output_dir, dataset=dataset, **models, **overrides)
    dataset = preference_dataset(n_rows)
    return make_trainer(*classes, output_dir, train_dataset=dataset, **models, **overrides)


def saved_policy(path: Path) -> str:
    """The tiny policy saved for every rank to load (the trainers build the reference
    from the policy's path). Within a process group transformers saves on rank 0 only:
    rank 0 writes, the others wait; without one, each rank writes a copy of its own."""
    if not torch.distributed.is_initialized():
        return saved_tiny_model(path.with_name(f"{path.name}-rank{os.environ.get('RANK', '0')}"))
    if torch.distributed.get_rank() == 0:
        saved_tiny_model(path)
    torch.distributed.barrier()
    return str(path)


def run(out: Path, entry: dict[str, Any], n_rows: int) -> None:
    """Train one run on this rank and write what the test compares."""
    name = entry["name"]
    kind = entry.get("kind", "dpo")
    models, profiler = {}, nullcontext()
    if "deepspeed" in entry:
        # what accelerate launch sets from its config: read by the config's __post_init__
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = entry["deepspeed"]
    if entry.get("tensor_parallel"):
        world = int(os.environ["WORLD_SIZE"])
        models = {
            "model": tensor_parallel(untied_tiny_model(POLICY_SEED), world),
            "ref_model": tensor_parallel(untied_tiny_model(REFERENCE_SEED), world),
        }
        profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    elif entry.get("untied"):
        models = {
            "model": untied_tiny_model(POLICY_SEED),
            "ref_model": untied_tiny_model(REFERENCE_SEED),
        }
    trainer = build(kind, entry["trainer"], out / name, n_rows, entry["overrides"], **models)
    with profiler:
        trainer.train()
    state = trainer.accelerator.state
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    model = trainer.accelerator.unwrap_model(trainer.model)
    head = model.get_output_embeddings().weight
    zero_stage = state.deepspeed_plugin.zero_stage if state.deepspeed_plugin else None
    # ZeRO-3's parameters are partitioned outside a forward: whole ones to compare, and
    # whether the head was (its local slice smaller than the whole, on every rank)
    head_partitioned = hasattr(head, "ds_tensor") and head.ds_tensor.numel() < head.ds_numel
    with whole_parameters(model, zero_stage):
        state_dict = {
            key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
            for key, value in model.state_dict().items()
        }
    result = {
        "state_dict": state_dict,
        "zero_stage": zero_stage,
        "head_partitioned": head_partitioned,
        "log_history": trainer.state.log_history,
        "world_size": state.num_processes,
        "rank": rank,
        "distributed_type": str(state.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        # what training ran through: DistributedDataParallel unless DDP was skipped
        "wrapper": type(trainer.model_wrapped).__name__,
        # DDP walks the forward's outputs for the parameters they reach only when True
        "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None),
    }
    if entry.get("tensor_parallel"):
        vocab, hidden = head.shape
        shapes = {tuple(shape) for event in profiler.events() for shape in event.input_shapes or ()}
        result |= {
            "head_split_by_row": head.device_mesh.ndim == 1 and head.placements == (Shard(0),),
            "head_local_rows": head.to_local().shape[0],
            # the largest [*, V] tensor any op of the 3 steps took, and whether the ops
            # saw the head's local rows (inside lenalign's operators too)
            "vocab_rows": profiled_vocab_rows(profiler, vocab, hidden),
            "local_head_seen": (head.to_local().shape[0], hidden) in shapes,
        }
    torch.save(result, out / f"{name}-rank{rank}.pt")


def whole_parameters(model: torch.nn.Module, zero_stage: int | None):
    """A context in which ZeRO-3's partitioned parameters are whole (none otherwise)."""
    if zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    out = Path(plan["out"])
    for entry in plan["runs"]:
        run(out, entry, plan["n_rows"])
    if torch.distributed.is_initialized():
        # every rank has written before any leaves, so a late rank is never torn down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
