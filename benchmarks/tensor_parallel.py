"""DPO training steps on a model split over CPU ranks: TRL's DPOTrainer against
LenalignDPOTrainer, peak memory per rank and bytes handed to collectives per step.

    python benchmarks/tensor_parallel.py [--steps 5] [--world 2] [--split tp|zero3]

``--split tp`` (the default), tensor parallelism: DPOTrainer's fused head all-gathers the
vocab-split LM head (``weight.full_tensor()``), LenalignDPOTrainer scores the head's
local rows vocab-parallel. ``--split zero3``, DeepSpeed ZeRO-3 (data parallelism with
every parameter partitioned, ``stage3_param_persistence_threshold`` 0): both trainers'
heads are gathered by DeepSpeed (docs/distributed.md, "DeepSpeed ZeRO-3"), and what
differs is what each forms from it.

The model is trl_step.py's ``vocab128k`` case (a 2-layer, 256-wide Llama with Llama 3's
128256-token vocabulary, 2 pairs of 128-byte prompts and 96-128-byte completions a step
per rank) with its LM head untied from the embedding, policy and reference alike.
``torchrun`` starts ``--world`` CPU processes joined by gloo on 127.0.0.1. Under ``tp``
each parallelizes both models with torch's own ``parallelize_module`` (attention and MLP
projections ColwiseParallel / RowwiseParallel, ``lm_head`` ColwiseParallel: its weight a
Shard(0) DTensor) and trains on the whole batch, as tensor parallelism without data
parallelism does (accelerate on a CPU runs no data parallelism here: no ``use_cpu``);
world 1 is the same model unsplit, for scale. Under ``zero3`` the launch sets what
``accelerate launch`` sets from a DeepSpeed config (``DS_ACCELERATOR=cpu``), each rank
takes its own pairs, and there is no world 1. A callback times each optimizer step and
measures its peak memory above the level at the step's start (the process's resident
memory); the last step is run under a dispatch mode that adds up the bytes of every
tensor handed to a collective (torch.distributed's and DTensor's functional ones). The
losses of the two trainers must agree (relative 1e-3) before anything is reported.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_step import CASES, TRAINERS, build, classes  # the sibling script

CASE = "vocab128k"
COLWISE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
)
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")
# every parameter partitioned (the default keeps those under 1e5 elements whole); batch
# sizes from the trainer's config, its own optimizer
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_allow_untested_optimizer": True,
}


class CollectiveBytes(TorchDispatchMode):
    """Adds up the bytes of the tensors handed to collectives (c10d's ops, which
    torch.distributed's calls dispatch to, and DTensor's functional collectives)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "c10d" in name and not any(skip in name for skip in ("wait_tensor", "wrap_tensor")):
            # c10d's gathers and scatters take (outputs, inputs, ...), the rest their input
            # first
            gathers = ("allgather", "reduce_scatter", "alltoall")
            two_sided = name.startswith("c10d.") and any(op in name for op in gathers)
            handed = args[1] if two_sided else args[0]
            self.total += sum(
                t.numel() * t.element_size()
                for t in torch.utils._pytree.tree_leaves(handed)
                if isinstance(t, torch.Tensor)
            )
        return func(*args, **(kwargs or {}))


def untied(model: torch.nn.Module) -> torch.nn.Module:
    """The model with an LM head of its own (a copy of the embedding's weight)."""
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def parallelized(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """``model`` split over a 1-D mesh of ``world`` ranks with torch's own styles."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {f"model.layers.*.{name}": ColwiseParallel() for name in COLWISE}
    plan |= {f"model.layers.*.{name}": RowwiseParallel() for name in ROWWISE}
    plan["lm_head"] = ColwiseParallel()
    return parallelize_module(model, init_device_mesh("cpu", (world,)), plan)


def worker(trainer_name: str, steps: int, split: str) -> dict:
    """One trainer's run on this rank: per-step seconds and peak bytes, the counted
    step's bytes, and the losses."""
    from transformers import TrainerCallback

    from lenalign.bench import peak_memory_probe

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and split == "tp":
        # under ZeRO-3, accelerate starts DeepSpeed's process group itself
        torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    case = CASES[CASE]
    models = []
    for seed in (0, 1):
        model, tokenizer, dataset = build(case, seed)
        split_here = world > 1 and split == "tp"
        models.append(parallelized(untied(model), world) if split_here else untied(model))
    Config, Trainer = classes("dpo", trainer_name)
    probe = peak_memory_probe(torch.device("cpu"))
    counter = CollectiveBytes()
    records: list[dict] = []

    class StepProbe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            # the last step's collectives are counted: a dispatch mode slows the steps
            # that run after it (measured here: 1.8 s instead of 1.25 s, and larger peaks)
            if state.global_step == steps - 1:
                counter.__enter__()
            probe.start()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.started
            peak = probe.stop()
            if state.global_step == steps:
                counter.__exit__(None, None, None)
            else:
                records.append({"seconds": seconds, "peak": peak})

    with tempfile.TemporaryDirectory() as output_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = Config(
            output_dir=output_dir,
            per_device_train_batch_size=case["pairs"],
            max_steps=steps,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
            learning_rate=1e-5,
            bf16=False,
            # one process: the CPU; several: no use_cpu, which would make accelerate deal
            # out batches as data parallelism (every rank of a TP group takes them all)
            # and drop DeepSpeed
            use_cpu=world == 1,
            **({"ddp_backend": "gloo"} if split == "zero3" else {}),
        )
        trainer = Trainer(
            model=models[0],
            ref_model=models[1],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepProbe()],
        )
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {"records": records, "sent": counter.total, "losses": losses}
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


def launch(trainer_name: str, world: int, steps: int, split: str, out: Path) -> list[dict]:
    """Every rank's worker result of one run."""
    script = [str(Path(__file__).resolve()), "--worker", trainer_name, "--split", split]
    script += ["--steps", str(steps), "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    if split == "zero3":
        config = out / "zero3.json"
        config.write_text(json.dumps(ZERO3))
        env |= {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config),
            "DS_ACCELERATOR": "cpu",
        }
    if world == 1:
        command = [sys.executable, *script]
    else:
        with socket.socket() as probe:  # a port nothing listens on now
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
            "--master-addr=127.0.0.1", f"--master-port={port}", *script,
        ]  # fmt: skip
    completed = subprocess.run(command, env=env, timeout=1800, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{trainer_name} on {world} ranks failed:\n{completed.stderr[-4000:]}")
    return [
        json.loads((out / f"{trainer_name}-world{world}-rank{rank}.json").read_text())
        for rank in range(world)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--split", choices=("tp", "zero3"), default="tp")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.split == "zero3" and options.world < 2:
        # one process runs use_cpu, where accelerate drops DeepSpeed
        parser.error("--split zero3 needs --world 2 or more")
    if options.worker:
        result = worker(options.worker, options.steps, options.split)
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        path = options.out / f"{options.worker}-world{world}-rank{rank}.json"
        path.write_text(json.dumps(result))
        return 0

    from lenalign.bench import machine_description

    print(json.dumps(machine_description(torch.device("cpu"))))
    print(f"split: {options.split}")
    lines = [
        "| trainer | ranks | median s / step | peak MiB / step, per rank | "
        "collective MiB / step, per rank |",
        "| --- | --- | --- | --- | --- |",
    ]
    labels = {"trl": "DPOTrainer", "lenalign": "LenalignDPOTrainer"}
    with tempfile.TemporaryDirectory() as out:
        worlds = sorted({1, options.world}) if options.split == "tp" else [options.world]
        for world in worlds:
            runs = {
                name: launch(name, world, options.steps, options.split, Path(out))
                for name in TRAINERS
            }
            for theirs, ours in zip(
                runs["trl"][0]["losses"], runs["lenalign"][0]["losses"], strict=True
            ):
                if abs(theirs - ours) > 1e-3 * max(abs(theirs), 1e-6):
                    raise RuntimeError(f"world {world}: losses differ: {theirs} and {ours}")
            for name in TRAINERS:
                ranks = runs[name]
                seconds = statistics.median(r["seconds"] for r in ranks[0]["records"][1:])
                peak = max(r["peak"] for rank in ranks for r in rank["records"][1:])
                sent = max(rank["sent"] for rank in ranks)
                lines.append(
                    f"| {labels[name]} | {world} | {seconds:.3f} | {peak / 2**20:.1f} | "
                    f"{sent / 2**20:.2f} |"
                )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
