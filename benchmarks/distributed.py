"""Vocab-parallel lenalign on this machine: time, peak memory and bytes sent per rank.

    python benchmarks/distributed.py [--worlds 1,2,4] [--out DIR]

For each world size, ``torchrun`` starts that many CPU processes joined by gloo on
127.0.0.1; each holds a torch.chunk slice of the vocabulary and runs forward + backward
of ``sequence_logprobs`` (the logits' slice) and of ``linear_sequence_logprobs`` (the
head's rows), with ``vocab_shard=``; world 1 is one process with the whole vocabulary
and no shard. Against it, "gather" all-gathers the logits' slices to every rank and runs
the single-process op there, what a caller without vocab-parallel support has to do.
Every result is checked against the single-process run before it is timed. The bytes
are those of the tensors handed to the collectives, counted as they are called.
Prints a markdown table; writes it and distributed.json to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

BATCH, STEPS, VOCAB, HIDDEN = 4, 512, 32000, 512
LINEAR_BATCH = 2  # the head's matmuls dominate: fewer rows keep the run short on 2 cores
REPEATS = 3


def _problem(batch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, VOCAB, (batch, STEPS), generator=generator)
    labels[:, : STEPS // 4] = -100  # the prompt
    return {
        "logits": torch.randn(batch, STEPS, VOCAB, generator=generator) * 2,
        "labels": labels,
        "hidden": torch.randn(batch, STEPS, HIDDEN, generator=generator),
        "weight": torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5,
    }


class _SentBytes:
    """Bytes of the tensors passed to all_reduce / all_gather, counted per call."""

    def __init__(self) -> None:
        self.total = 0
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
            original = getattr(dist, name)
            setattr(dist, name, self._counting(original))

    def _counting(self, original):
        def call(*args, **kwargs):
            tensor = args[1] if original.__name__.startswith("all_gather") else args[0]
            self.total += tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)

        call.__name__ = original.__name__
        return call


def _run_worker(out: Path) -> None:
    import lenalign
    from lenalign.bench.probes import HostPeakMemory

    sharded = "RANK" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    sent = _SentBytes()
    rank = dist.get_rank() if sharded else 0
    world = dist.get_world_size() if sharded else 1
    shard = lenalign.VocabShard.from_vocab(VOCAB) if sharded else None
    start, stop = (shard.start, shard.stop) if shard else (0, VOCAB)
    data = _problem(BATCH)
    head = _problem(LINEAR_BATCH)
    logits = data["logits"][..., start:stop].contiguous()
    weight = head["weight"][start:stop].contiguous()

    def logits_step():
        part = logits.clone().requires_grad_()
        result = lenalign.sequence_logprobs(
            part, data["labels"], shift=True, vocab_shard=shard, inplace_backward=True
        )
        (result.sum.sum() + result.mean.sum()).backward()
        return result.sum

    def gather_step():
        parts = [torch.empty_like(logits) for _ in range(world)] if world > 1 else None
        part = logits.clone().requires_grad_()
        if parts is not None:
            dist.all_gather(parts, part.detach())
        full = torch.cat(parts, dim=-1).requires_grad_() if parts else part
        result = lenalign.sequence_logprobs(full, data["labels"], shift=True, inplace_backward=True)
        (result.sum.sum() + result.mean.sum()).backward()
        return result.sum

    def linear_step():
        hidden = head["hidden"].clone().requires_grad_()
        local = weight.clone().requires_grad_()
        result = lenalign.linear_sequence_logprobs(
            hidden, local, head["labels"], shift=True, vocab_shard=shard
        )
        (result.sum.sum() + result.mean.sum()).backward()
        return result.sum

    steps = {"logits": logits_step, "linear": linear_step}
    if world > 1:
        steps["gather"] = gather_step
    record: dict[str, dict] = {}
    probe = HostPeakMemory()
    for name, step in steps.items():
        value = step()  # warm-up, and the value checked against one process
        seconds = []
        for _ in range(REPEATS):
            sent.total = 0
            if sharded:
                dist.barrier()
            probe.start()
            began = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - began)
            peak = probe.stop()
            record[name] = {"sent_bytes": sent.total}
        record[name] |= {
            "seconds": statistics.median(seconds),
            "peak_bytes": peak,
            "sum": value.tolist(),
        }
    record["rank"], record["world"] = rank, world
    (out / f"world{world}-rank{rank}.json").write_text(json.dumps(record))
    if sharded:
        dist.destroy_process_group()


def _launch(world: int, out: Path) -> list[dict]:
    script = [str(Path(__file__).resolve()), "--worker", "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
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
    subprocess.run(command, env=env, check=True, timeout=900)
    return [json.loads((out / f"world{world}-rank{r}.json").read_text()) for r in range(world)]


def _table(results: dict[int, list[dict]]) -> str:
    one = results[1][0]
    lines = [
        "| path | world | time per rank (s) | vs 1 process | peak per rank (MiB) "
        "| vs 1 process | sent per rank per step (KiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("logits", "gather", "linear"):
        for world, ranks in results.items():
            if name not in ranks[0]:
                continue
            seconds = max(r[name]["seconds"] for r in ranks)
            peak = max(r[name]["peak_bytes"] for r in ranks)
            base = one["logits" if name == "gather" else name]
            sent = max(r[name]["sent_bytes"] for r in ranks) / 1024
            lines.append(
                f"| {name} | {world} | {seconds:.3f} | {seconds / base['seconds']:.2f}x "
                f"| {peak / 2**20:.1f} | {peak / base['peak_bytes']:.2f}x | {sent:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--out", default="bench-results/distributed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        _run_worker(out)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    if 1 not in worlds:
        worlds.insert(0, 1)
    results = {world: _launch(world, out) for world in worlds}
    reference = results[1][0]
    for ranks in results.values():
        for rank in ranks:
            for name in ("logits", "gather", "linear"):
                if name in rank:
                    base = reference["logits" if name == "gather" else name]["sum"]
                    torch.testing.assert_close(
                        torch.tensor(rank[name]["sum"]), torch.tensor(base), rtol=1e-4, atol=1e-3
                    )
    table = _table(results)
    shape = f"logits {BATCH}x{STEPS}x{VOCAB} fp32; head {LINEAR_BATCH}x{STEPS}x{HIDDEN} -> {VOCAB}"
    text = f"{shape}, {REPEATS} repeats (median), one thread per process\n\n{table}\n"
    print(text)
    (out / "distributed.md").write_text(text)
    (out / "distributed.json").write_text(json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
