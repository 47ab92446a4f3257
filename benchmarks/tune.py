"""Sweep the row kernels' launch parameters (BLOCK_V, num_warps) and report bandwidth.

    python benchmarks/tune.py --out DIR            # on a GPU: bf16, 8192 rows
    python benchmarks/tune.py --vocab 128256 --blocks 4096 8192 --warps 8 16

kernels/launch.py picks (BLOCK_V, num_warps) from the vocabulary and element size
alone. This script measures every candidate pair on the device, forward and backward
apart, at every counted row (the kernels skip the others, so counted rows are where the
time goes): achieved bytes per second against the kernel's byte floor (forward reads the
logits once; backward reads them and writes the gradient once) and against the device's
copy bandwidth measured in the same run. Each candidate is first checked against the
pure-PyTorch backend on the same input: a candidate whose outputs disagree is reported
as failed, never timed. Writes tune.json and tune.md to --out and prints the table; the
row that the heuristic picks is marked, so a GPU run shows what changing it would gain.

On CPU it needs TRITON_INTERPRET=1 and runs at a tiny size: a check of the script, not
a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from lenalign import kernels, torch_backend
from lenalign.bench import Clock, copy_bandwidth, machine_description
from lenalign.kernels.launch import vocab_block

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULTS = {
    "cuda": {"rows": 8192, "vocab": [32000, 128256, 262144], "blocks": [2048, 4096, 8192, 16384]},
    "cpu": {"rows": 6, "vocab": [300, 1000], "blocks": [128, 256]},
}
DEFAULT_WARPS = {"cuda": [4, 8, 16, 32], "cpu": [1, 2]}
TIMED_CALLS = {"cuda": 20, "cpu": 2}
# forward: fp32 results of fp32 accumulations in different orders. Backward: the fp32
# values c * (1[v == y] - p) differ by a few fp32 ulps of |c| (the kernel's exp is the
# GPU's approximate one), and each is rounded once to the logits' dtype: one ulp there
LOGPROB_TOLERANCE = 1e-4
GRADIENT_ULPS = 1
EXP_ULPS = 8


class Problem:
    """Logits [1, rows, V] of every row counted, targets, and the PyTorch backend's answer."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        # drawn on the device: 8192 x 262144 normals take about 20 s on a CPU core
        generator = torch.Generator(device=device).manual_seed(vocab)
        logits = 3 * torch.randn(1, rows, vocab, generator=generator, device=device)
        self.logits = logits.to(dtype=dtype)
        self.targets = torch.randint(0, vocab, (rows,), generator=generator, device=device)
        self.coef = torch.rand(rows, generator=generator, device=device).add_(0.5)
        self.grad = torch.empty_like(self.logits)
        self.want_logprob, self.row_max, self.log_sum = torch_backend.row_logprob_forward(
            self.logits, self.targets, torch.float32
        )
        self.want_grad = torch_backend.row_logprob_backward(
            self.logits,
            self.targets,
            self.row_max,
            self.log_sum,
            self.coef,
            torch.empty_like(self.logits),
        ).float()

    def forward(self, launch: tuple[int, int]) -> torch.Tensor:
        return kernels.row_logprob_forward(self.logits, self.targets, torch.float32, launch)[0]

    def backward(self, launch: tuple[int, int]) -> torch.Tensor:
        return kernels.row_logprob_backward(
            self.logits,
            self.targets,
            self.row_max,
            self.log_sum,
            self.coef,
            self.grad,
            launch,
        )

    def disagreement(self, kernel: str, launch: tuple[int, int]) -> str | None:
        """Why this launch's output is wrong, or None when it matches the PyTorch backend."""
        if kernel == "forward":
            got = self.forward(launch)
            error = (got - self.want_logprob).abs() / (1 + self.want_logprob.abs())
            worst = error.max().item()
            if not worst <= LOGPROB_TOLERANCE:
                return f"log-probabilities off by {worst:.3g} (relative), over {LOGPROB_TOLERANCE}"
            return None
        got = self.backward(launch).float()
        rounding = GRADIENT_ULPS * torch.finfo(self.logits.dtype).eps * self.want_grad.abs()
        exp_slack = EXP_ULPS * torch.finfo(torch.float32).eps * self.coef.abs()
        allowed = (rounding + exp_slack[None, :, None]).clamp(min=1e-30)
        worst = ((got - self.want_grad).abs() / allowed).max().item()
        if not worst <= 1:
            return (
                f"gradient off by {worst:.3g}x its tolerance ({GRADIENT_ULPS} ulp of the dtype "
                f"+ {EXP_ULPS} fp32 ulps of |c|)"
            )
        return None


def candidates(
    vocab: int, element_size: int, blocks: list[int], warps: list[int]
) -> list[tuple[int, int]]:
    """The (BLOCK_V, num_warps) pairs to run: the heuristic's, then every pair given whose
    block is no wider than the padded row and holds at least one element per thread."""
    widest = 1 << (vocab - 1).bit_length()
    pairs = [vocab_block(vocab, element_size)]
    pairs += [(b, w) for b in blocks for w in warps if 32 * w <= b <= widest]
    return list(dict.fromkeys(pairs))


def sweep(
    problem: Problem,
    launches: list[tuple[int, int]],
    clock: Clock,
    calls: int,
    copy_bytes_per_s: float,
) -> list[dict]:
    """Check, then time, every launch for both kernels; one row per (kernel, launch)."""
    logits = problem.logits
    floor_bytes = {"forward": logits.numel() * logits.element_size()}
    floor_bytes["backward"] = 2 * floor_bytes["forward"]
    heuristic = vocab_block(logits.shape[-1], logits.element_size())
    rows = []
    for kernel in ("forward", "backward"):
        call: Callable[[tuple[int, int]], torch.Tensor] = getattr(problem, kernel)
        for launch in launches:
            row = {
                "kernel": kernel,
                "vocab": logits.shape[-1],
                "block": launch[0],
                "warps": launch[1],
                "heuristic": launch == heuristic,
            }
            row["failure"] = problem.disagreement(kernel, launch)
            if row["failure"] is None:
                call(launch)
                seconds = statistics.median(
                    clock.time(lambda call=call, launch=launch: call(launch)) for _ in range(calls)
                )
                row["seconds"] = seconds
                row["bytes_per_s"] = floor_bytes[kernel] / seconds
                row["pct_of_copy"] = 100 * row["bytes_per_s"] / copy_bytes_per_s
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown, best launch of each (kernel, V) first; the heuristic's marked with *."""
    lines = [
        "| kernel | V | BLOCK_V | warps | time | GB/s of floor | % of copy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["vocab"]), []).append(row)
    for group in groups.values():
        for row in sorted(group, key=lambda r: r.get("seconds", float("inf"))):
            mark = " *" if row["heuristic"] else ""
            if row["failure"] is not None:
                figures = f"failed: {row['failure']} | | "
            else:
                figures = (
                    f"{row['seconds'] * 1e3:.3f} ms | {row['bytes_per_s'] / 1e9:.3g} | "
                    f"{row['pct_of_copy']:.3g}%"
                )
            lines.append(
                f"| {row['kernel']} | {row['vocab']} | {row['block']}{mark} | {row['warps']} | "
                f"{figures} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    defaults = DEFAULTS[device.type]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--rows", type=int, default=defaults["rows"])
    parser.add_argument("--vocab", type=int, nargs="+", default=defaults["vocab"])
    parser.add_argument("--blocks", type=int, nargs="+", default=defaults["blocks"])
    parser.add_argument("--warps", type=int, nargs="+", default=DEFAULT_WARPS[device.type])
    parser.add_argument("--out", type=Path, default=Path("tune-results"))
    args = parser.parse_args(argv)
    if device.type == "cpu" and not kernels.INTERPRETED:
        parser.error("no GPU: set TRITON_INTERPRET=1 to run the kernels through the interpreter")
    if args.rows < 1:
        parser.error(f"--rows must be positive, got {args.rows}")
    for name in ("vocab", "blocks", "warps"):
        for value in getattr(args, name):
            if value < 1:
                parser.error(f"--{name} must be positive, got {value}")
    for value in args.blocks + args.warps:
        if value & (value - 1):
            parser.error(f"--blocks and --warps must be powers of two, got {value}")

    clock = Clock(device)
    copy_bytes_per_s = copy_bandwidth(device, clock)
    rows = []
    for vocab in args.vocab:
        dtype = DTYPES[args.dtype]
        launches = candidates(vocab, dtype.itemsize, args.blocks, args.warps)
        problem = Problem(args.rows, vocab, dtype, device)
        rows += sweep(problem, launches, clock, TIMED_CALLS[device.type], copy_bytes_per_s)
        print(f"V={vocab}: {len(launches)} launches checked and timed", file=sys.stderr)
        del problem
    table = format_table(rows)
    print(f"{args.rows} rows of {args.dtype}; device copy {copy_bytes_per_s / 1e9:.0f} GB/s")
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_description(device),
        "dtype": args.dtype,
        "rows": args.rows,
        "copy_bytes_per_s": copy_bytes_per_s,
        "results": rows,
    }
    (args.out / "tune.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "tune.md").write_text(table + "\n")
    return 1 if any(row["failure"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
