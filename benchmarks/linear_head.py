"""From hidden states: lenalign's fused head against eager, compile, TRL, Liger and CCE.

    python benchmarks/linear_head.py --out DIR          # GPU: bf16, the six default cases
    python benchmarks/linear_head.py --dry --out DIR    # CPU: the plumbing, in seconds
    python benchmarks/linear_head.py --shape 4x2048x4096x151936 --contender lenalign

Each case is a causal batch of B sequences of T tokens (B * T = 8192 on a GPU): hidden
states [B, T, H], the head's weight [V, H], random labels, and a mask that counts every
position ("all") or about the second half of each sequence ("half", a prompt share
masked). Every contender (benchmarks/head_contenders.py) computes the label log-probs
[B, T - 1] and each sequence's sum and mean, and differentiates sum_b sign_b * mean_b
(signs +1, -1, ... as a DPO step weighs chosen and rejected) into the hidden states and
the weight. GPU shapes: V = 151936 (Qwen3's vocabulary) with H = 4096 (Qwen3 8B, the
shape of TRL issue 7244) and H = 3584, and V = 128256 with H = 4096 (Llama 3 8B).

Checked before timed: the token log-probs, sums and both gradients are compared with a
truth computed from the same inputs in float32 on a GPU (float64 on CPU, and for float32
inputs). A contender fails, and is not timed, when any max abs error exceeds
max(8 x eager's own error in the same dtype, 8 x the dtype's epsilon x the largest
|truth| of that figure): a shifted label or a miscounted mean is off by orders of
magnitude more, while honest 16-bit rounding stays within a few times eager. Eager, the
yardstick, is held to the second term alone. Then (the check was the warm-up call)
``--repeats`` timed calls, the median reported with the peak memory above the inputs
(PyTorch's allocator on a GPU, the resident size on CPU). A contender that is not
installed or cannot run on the device is reported as skipped with the reason; the exit
status is 1 if any contender failed (130 if interrupted).

``--dry``: CPU, one 4x16x32x1000 float32 shape, 2 timed calls. The compile contender
uses backend="aot_eager" there (traced as on a GPU, without inductor's 16 s C++ build);
Liger and CCE, Triton kernels for a GPU, are tried only under TRITON_INTERPRET=1 and
are skipped with the reason where they cannot run.

``--out DIR`` writes linear_head.json (every figure, strict JSON) and linear_head.md,
rewritten after every contender so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

from lenalign.backends import select_backend
from lenalign.bench import (
    Clock,
    machine_description,
    peak_memory_probe,
    shape_parser,
    write_json,
)


def _sibling(name: str) -> ModuleType:
    """benchmarks/<name>.py by path: the scripts here are not a package, and the tests
    load this one by path too, with benchmarks/ off sys.path."""
    spec = importlib.util.spec_from_file_location(
        f"lenalign_benchmark_{name}", Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


head_contenders = _sibling("head_contenders")
CONTENDERS = head_contenders.CONTENDERS
HeadContender = head_contenders.HeadContender

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = {
    # TRL issue 7244's shape first: a run cut short keeps the case most asked about
    "cuda": ["4x2048x4096x151936", "4x2048x3584x151936", "4x2048x4096x128256"],
    "cpu": ["4x256x256x32000"],
    "dry": ["4x16x32x1000"],
}
REPEATS = {"cuda": 5, "cpu": 3, "dry": 2}
COUNTED = ("all", "half")
FIGURES = ("token_logprobs", "sum", "grad_hidden", "grad_weight")
EAGER_FACTOR = 8
EPS_FACTOR = 8
# Estimate: GEMM rates reached on one H200 (16-bit with fp32 accumulation, below the
# 990 TFLOP/s peak since Liger's and CCE's loops are not all GEMM; fp32 without TF32 for
# the truth) and the one-off costs (CUDA start, Triton JIT of four packages' kernels,
# torch.compile static and then dynamic); on CPU a rough rate, a dry run being mostly
# imports and torch.compile.
GEMM_FLOPS = {"cuda16": 3e14, "cuda32": 4e13, "cpu": 3e10}
START_SECONDS = {"cuda": 50.0, "cpu": 12.0}
parse_shape = shape_parser("BxTxHxV", "4x2048x4096x151936")


class Case(NamedTuple):
    """One batch: hidden [B, T, H] and weight [V, H] in the dtype, labels [B, T] int64,
    mask [B, T] bool, signs [B] float32 (the upstream weights of the means)."""

    name: str
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    signs: torch.Tensor


def make_cases(shape, dtype: torch.dtype, device: torch.device) -> list[Case]:
    """The two cases of a shape (all counted, about half counted), on the same tensors."""
    batch, steps, features, vocab = shape
    # drawn on the device: 151936 x 4096 normals take seconds on a CPU, milliseconds there
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, steps, features, generator=gen, device=device).to(dtype)
    weight = torch.randn(vocab, features, generator=gen, device=device).div_(features**0.5)
    weight = weight.to(dtype)  # logits of about unit variance
    labels = torch.randint(0, vocab, (batch, steps), generator=gen, device=device)
    signs = torch.tensor([(-1.0) ** b for b in range(batch)], device=device)
    starts = torch.randint(steps // 3, 2 * steps // 3, (batch, 1), generator=gen, device=device)
    masks = {
        "all": torch.ones(batch, steps, dtype=torch.bool, device=device),
        "half": torch.arange(steps, device=device)[None, :] >= starts,
    }
    label = "x".join(map(str, shape))
    return [Case(f"{label} {c}", hidden, weight, labels, masks[c], signs) for c in COUNTED]


def run_step(step, case: Case, cast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One forward + backward of ``step``; the inputs cast to ``cast`` first, if given."""
    hidden = case.hidden.detach().to(cast or case.hidden.dtype).requires_grad_(True)
    weight = case.weight.detach().to(cast or case.weight.dtype).requires_grad_(True)
    tokens, seq_sum, seq_mean = step(hidden, weight, case.labels, case.mask)
    (case.signs.to(seq_mean.dtype) * seq_mean).sum().backward()
    values = (tokens.detach(), seq_sum.detach(), hidden.grad, weight.grad)
    return dict(zip(FIGURES, values, strict=True))


def truth_step(hidden, weight, labels, mask):
    """The definition, written apart from every contender: log_softmax of the full
    logits in the inputs' (high) precision, the labels picked, masked and summed."""
    counted = mask[:, 1:]
    log_probs = torch.log_softmax(torch.nn.functional.linear(hidden[:, :-1], weight), dim=-1)
    picked = log_probs.gather(-1, labels[:, 1:, None]).squeeze(-1)
    tokens = torch.where(counted, picked, 0.0)
    seq_sum = tokens.sum(1)
    return tokens, seq_sum, seq_sum / counted.sum(1).clamp(min=1)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference, computed in the truth's precision (nan if not finite)."""
    value = float((got.to(want.dtype) - want).abs().max())
    return value if math.isfinite(value) else math.nan


def measure(contender, case: Case, truth, eager_errors, clock, probe, repeats) -> dict:
    """Check, then time one contender on one case: a row of the report."""
    row = {"contender": contender.name, "summary": contender.summary}
    device = case.hidden.device
    reason = contender.unavailable(device)
    if reason is not None:
        return row | {"status": "skipped", "reason": reason}
    try:
        got = run_step(contender.run, case)
    except Exception as error:  # reported, never raised: the other contenders still run
        what = f"{type(error).__name__}: {error}".strip()[:800]
        if contender.gpu_kernel and device.type != "cuda":
            return row | {"status": "skipped", "reason": f"on CPU, in Triton's interpreter: {what}"}
        return row | {"status": "failed", "reason": what}
    errors = {k: max_error(got[k], truth[k]) for k in FIGURES}
    del got
    eps = torch.finfo(case.hidden.dtype).eps
    bounds = {}
    for k in FIGURES:
        floor = EPS_FACTOR * eps * float(truth[k].abs().max())
        eager = eager_errors.get(k) if contender.name != "eager" else None
        bounds[k] = max(floor, EAGER_FACTOR * eager) if eager is not None else floor
    row |= {"errors": errors, "bounds": bounds}
    wrong = [k for k in FIGURES if not errors[k] <= bounds[k]]  # nan is wrong
    if wrong:
        said = ", ".join(f"{k} {errors[k]:.3g} > {bounds[k]:.3g}" for k in wrong)
        return row | {"status": "failed", "reason": f"max abs error over the bound: {said}"}
    try:
        probe.start()
        times = [clock.time(lambda: run_step(contender.run, case)) for _ in range(repeats)]
        # None where the probe cannot measure here (HostPeakMemory outside Linux)
        peak = None if getattr(probe, "reason", None) else probe.stop()
    except Exception as error:
        return row | {"status": "failed", "reason": f"timed call: {type(error).__name__}: {error}"}
    return row | {
        "status": "measured",
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_bytes": peak,
    }


def compare_with_eager(rows: list[dict]) -> None:
    """Adds each measured row's ratios to eager: time, memory, and each error."""
    eager = next((r for r in rows if r["contender"] == "eager" and "errors" in r), None)
    for row in rows:
        if eager is None or "errors" not in row:
            continue
        ratio = {
            k: row["errors"][k] / eager["errors"][k] if eager["errors"][k] else None
            for k in FIGURES
        }
        if row["status"] == "measured" and eager["status"] == "measured":
            ratio["time"] = row["median_s"] / eager["median_s"]
            if row["peak_bytes"] is not None and eager["peak_bytes"] is not None:
                ratio["memory"] = row["peak_bytes"] / max(eager["peak_bytes"], 1)
        row["vs_eager"] = ratio


def _ratio(row: dict, key: str) -> str:
    value = row.get("vs_eager", {}).get(key)
    return "" if value is None else f"{value:.2f}x"


def markdown(report: dict) -> str:
    """A machine line, the contenders, then a Markdown table per case."""
    m = report["machine"]
    versions = ", ".join(f"{k} {v or '-'}" for k, v in report["packages"].items())
    lines = [
        f"Machine: {m['name']}; torch {m['torch']}, triton {m['triton']}, python "
        f"{m['python']}; {versions}. Inputs {report['dtype']}, truth {report['truth_dtype']}, "
        f"median of {report['repeats']} timed calls after a checked one; lenalign's backend: "
        f"{report['lenalign_backend']}. Errors: max abs against the truth (x eager's).",
        "",
    ]
    rows = report["cases"][0]["results"] if report["cases"] else []
    lines += [f"- {row['contender']}: {row['summary']}" for row in rows]
    return "\n".join(lines) + "".join("\n" + case_table(case) for case in report["cases"])


def case_table(case: dict) -> str:
    """One case's Markdown table: times, memory and errors, each with its ratio to eager."""
    lines = [
        f"**{case['case']}** ({case['counted_tokens']} of {case['tokens']} tokens counted)",
        "",
        "| contender | median | vs eager | peak above inputs | vs eager | "
        "token log-probs | sums | grad hidden | grad weight |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in case["results"]:
        if row["status"] == "measured":
            peak = row["peak_bytes"]
            cells = [
                f"{row['median_s'] * 1e3:.1f} ms",
                _ratio(row, "time"),
                "n/a" if peak is None else f"{peak / 2**20:.0f} MiB",
                _ratio(row, "memory"),
            ]
        else:  # one line in one cell, whatever the error said
            reason = " ".join(row["reason"].split()).replace("|", "\\|")
            cells = [f"{row['status'].upper()}: {reason}", "", "", ""]
        for k in FIGURES:
            error = row.get("errors", {}).get(k)
            said = "" if error is None else f"{error:.2e}"
            ratio = _ratio(row, k) if row["contender"] != "eager" else ""
            cells.append(f"{said} ({ratio})" if said and ratio else said)
        lines.append(f"| {row['contender']} | " + " | ".join(cells) + " |")
    return "\n" + "\n".join(lines) + "\n"


def write(report: dict, out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    # strict JSON, as lenalign bench writes it: a nan error becomes the string "nan" (and
    # is a failure, said in the reason)
    write_json(report, out / "linear_head.json")
    (out / "linear_head.md").write_text(markdown(report))


def estimate(shapes, names, repeats: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds the run should take: the head's GEMMs at the device's rate, plus start-up."""
    rate = GEMM_FLOPS["cpu" if device.type == "cpu" else f"cuda{8 * dtype.itemsize}"]
    seconds = START_SECONDS[device.type]
    for batch, steps, features, vocab in shapes:
        gemm = 2 * batch * steps * features * vocab
        # recomputing contenders run 4 GEMMs a call (eager 3); the truth runs 3 at fp32
        seconds += len(COUNTED) * (len(names) * (1 + repeats) * 4 * gemm / rate)
        seconds += len(COUNTED) * 3 * gemm / GEMM_FLOPS["cpu" if device.type == "cpu" else "cuda32"]
    return seconds


def run_case(case: Case, names, contenders, truth_dtype, clock, probe, repeats, report, out):
    """Every contender on one case, the report rewritten after each."""
    started = time.perf_counter()
    entry = {
        "case": case.name,
        "shape": dict(zip("BTHV", (*case.hidden.shape, case.weight.shape[0]), strict=True)),
        "tokens": case.mask.numel(),
        "counted_tokens": int(case.mask[:, 1:].sum()),
        "results": [],
    }
    report["cases"].append(entry)
    truth = run_step(truth_step, case, cast=truth_dtype)
    eager_errors: dict[str, float] = {}
    for name in names:
        row = measure(contenders[name], case, truth, eager_errors, clock, probe, repeats)
        passed = "errors" in row and all(row["errors"][k] <= row["bounds"][k] for k in FIGURES)
        if name == "eager" and passed:  # the yardstick only if eager passed its own check
            eager_errors = row["errors"]
        entry["results"].append(row)
        compare_with_eager(entry["results"])
        entry["seconds"] = time.perf_counter() - started
        said = row.get("reason") or f"{row['median_s'] * 1e3:.1f} ms"
        print(f"  {case.name} {name}: {row['status']}: {said}", flush=True)
        write(report, out)
    print(case_table(entry), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=parse_shape, action="append", metavar="BxTxHxV")
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, help="timed calls after the checked one")
    parser.add_argument(
        "--contender",
        action="append",
        choices=list(CONTENDERS),
        help="run only these (eager always runs: it is the yardstick)",
    )
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shape, float32")
    parser.add_argument("--out", type=Path, help="write linear_head.json and .md here")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    cuda = torch.cuda.is_available() and not args.dry
    device = torch.device("cuda" if cuda else "cpu")
    kind = "dry" if args.dry else device.type
    shapes = args.shape or [parse_shape(s) for s in SHAPES[kind]]
    repeats = args.repeats or REPEATS[kind]
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    # the truth needs more precision than the inputs; float64 GEMMs are slow on a GPU only
    truth_dtype = torch.float32 if cuda and dtype.itemsize == 2 else torch.float64
    contenders = dict(CONTENDERS)
    if args.dry:  # inductor's C++ build would be most of a dry run's time
        contenders["compile"] = head_contenders.compile_contender("aot_eager")
    names = ["eager", *[n for n in contenders if n != "eager" and n in (args.contender or [n])]]
    report = {
        "benchmark": "linear_head",
        "machine": machine_description(device),
        "packages": head_contenders.installed_versions(),
        "dtype": str(dtype).removeprefix("torch."),
        "truth_dtype": str(truth_dtype).removeprefix("torch."),
        "repeats": repeats,
        "dry": args.dry,
        "lenalign_backend": select_backend("auto", device),
        "error_bound": f"max abs error <= max({EAGER_FACTOR} x eager's, {EPS_FACTOR} x eps "
        "x max |truth|); eager: the second term alone",
        "estimate_s": estimate(shapes, names, repeats, dtype, device),
        "complete": False,
        "cases": [],
    }
    print(
        f"{report['machine']['name']}; torch {torch.__version__}; {report['dtype']}; "
        f"{len(shapes) * len(COUNTED)} cases x {len(names)} contenders; estimate "
        f"{report['estimate_s']:.0f} s",
        flush=True,
    )
    # an fp32 truth (and fp32 contenders) must not run on TF32 tensor cores
    torch.set_float32_matmul_precision("highest")
    clock, probe = Clock(device), peak_memory_probe(device)
    started = time.perf_counter()
    try:
        for shape in shapes:
            for case in make_cases(shape, dtype, device):
                run_case(
                    case, names, contenders, truth_dtype, clock, probe, repeats, report, args.out
                )
                report["wall_s"] = time.perf_counter() - started
        report["complete"] = True
    except KeyboardInterrupt:  # gpu.sh stops a step with SIGINT at the end of its budget
        print("interrupted: the report holds what was measured so far", flush=True)
    report["wall_s"] = time.perf_counter() - started
    write(report, args.out)
    failed = [
        f"{c['case']} {r['contender']}"
        for c in report["cases"]
        for r in c["results"]
        if r["status"] == "failed"
    ]
    print(
        f"wall time {report['wall_s']:.1f} s (estimate {report['estimate_s']:.0f} s); "
        f"failed: {', '.join(failed) or 'none'}",
        flush=True,
    )
    if not report["complete"]:
        return 130  # as a shell reports a SIGINT
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
