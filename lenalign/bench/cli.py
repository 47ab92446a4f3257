"""``lenalign bench``: lenalign against eager PyTorch and the other implementations.

Measures the per-sequence log-likelihoods of a preference batch (logits [B, T, V], a
completion mask counting about half of the positions, shift=True), forward only and
forward + backward, for every contender of ``lenalign.bench.contenders``; prints a table
and writes JSON, Markdown and a PNG chart. With no arguments it runs the suite of the
device it finds: bf16 with 4k and 16k tokens on a GPU, a quick fp32 pair of cases on CPU.

The cases run in a spawned worker process, so that host peak memory is read from a
process that holds nothing but the benchmark. One worker serves all cases, so that
torch.compile keeps its compiled graphs from case to case as a trainer would; if it dies
(killed for memory, say), the case is reported as failed and a fresh worker takes the
next one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from .case import MIN_REPEATS, RunOptions, worker_main
from .contenders import CONTENDERS
from .load import background_load
from .report import format_table, write_chart, write_json, write_markdown
from .workload import MODES, CaseSpec

VOCABULARIES = (32000, 128256, 151936, 262144)
# the CPU target shape of the design: 2048 positions of a 128256-token vocabulary
CPU_TARGET = (4, 512, 128256)
# Every vocabulary at 4k (4 x 1024) and 16k (8 x 2048) tokens. The first two cases differ
# in B, T and V at once: torch.compile keeps its graphs across cases and, at the first
# change of shape, recompiles once with all three dimensions dynamic, instead of once
# per dimension that changes later.
GPU_SHAPES = (
    (4, 1024, 32000),
    (8, 2048, 128256),
    (8, 2048, 32000),
    (4, 1024, 128256),
    (4, 1024, 151936),
    (8, 2048, 151936),
    (4, 1024, 262144),
    (8, 2048, 262144),
)
DEFAULT_REPEATS = {"cpu": 5, "cuda": 20}
# the time after which a row stops adding timed calls (see RunOptions)
ROW_SECONDS = {"cpu": 8.0, "cuda": 2.0}


def default_shapes(device_type: str, full: bool) -> list[tuple[int, int, int]]:
    """The (B, T, V) cases of a run without ``--shape``.

    On a GPU the GPU suite. On CPU the target shape, then the same tokens with the
    smallest vocabulary, which keeps ``make bench`` within 3 minutes on two cores;
    ``full`` adds the other two vocabularies.
    """
    if device_type == "cuda":
        return list(GPU_SHAPES)
    batch, steps, target_vocab = CPU_TARGET
    vocabularies = (target_vocab, VOCABULARIES[0])
    if full:
        vocabularies += tuple(vocab for vocab in VOCABULARIES if vocab not in vocabularies)
    return [(batch, steps, vocab) for vocab in vocabularies]


def shape_parser(letters: str, example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for a shape written like ``letters`` (``"BxTxV"``): every size
    >= 1, and T >= 2, since the causal shift needs two positions to count one."""
    names = letters.split("x")
    minimum = {name: 2 if name == "T" else 1 for name in names}

    def parse(text: str) -> tuple[int, ...]:
        try:
            sizes = tuple(int(part) for part in text.lower().split("x"))
        except ValueError:
            sizes = ()
        if len(sizes) != len(names):
            raise argparse.ArgumentTypeError(f"expected {letters} such as {example}, got {text!r}")
        if any(size < minimum[name] for name, size in zip(names, sizes, strict=True)):
            bounds = ", ".join(f"{name} >= {minimum[name]}" for name in names)
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}")
        return sizes

    return parse


parse_shape = shape_parser("BxTxV", "4x512x128256")


def _names(known: tuple[str, ...], what: str):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            given = ", ".join(unknown) or "(none given)"
            raise argparse.ArgumentTypeError(
                f"unknown {what} {given}; choose from {', '.join(known)}"
            )
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenalign bench",
        description="Time, peak memory and bandwidth of lenalign against eager PyTorch, "
        "torch.compile, Liger and TRL on a preference batch.",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available, else cpu",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="logits dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        metavar="BxTxV",
        help="a case to run, repeatable (default: the device's suite)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="on CPU, run every vocabulary at the target tokens (4x512), not only two",
    )
    parser.add_argument(
        "--contenders",
        type=_names(tuple(CONTENDERS), "contender"),
        default=tuple(CONTENDERS),
        help="comma-separated subset of: " + ", ".join(CONTENDERS),
    )
    parser.add_argument(
        "--modes",
        type=_names(MODES, "mode"),
        default=MODES,
        help="comma-separated subset of: " + ", ".join(MODES),
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="most timed calls per contender and mode (default: 5 on cpu, 20 on cuda); "
        "at least 3, and no more once they take 8 s (cpu) or 2 s (cuda)",
    )
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="keep N cores busy with spinning processes while the cases run, as another "
        "job on a shared machine would (default: 0)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="folder for bench.json, bench.md and bench.png (default: %(default)s)",
    )
    parser.add_argument(
        "--extra-contender",
        action="append",
        default=[],
        metavar="MODULE:ATTRIBUTE",
        help="also run the Contender at MODULE:ATTRIBUTE (used to test the harness)",
    )
    return parser


class WorkerDiedError(RuntimeError):
    """The worker process exited without answering."""


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (SIGKILL: often the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        return f"the worker process was killed by {name}{hint}"
    return f"the worker process exited with code {code}"


class Worker:
    """A spawned process that runs cases one at a time (``case.worker_main``)."""

    def __init__(self) -> None:
        # spawn, not fork: a fresh interpreter whose memory and CUDA state are its own
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=worker_main, args=(child_end,))
        self._process.start()
        child_end.close()

    def run(self, spec: CaseSpec, options: RunOptions) -> dict:
        self._connection.send((spec, options))
        try:
            return self._connection.recv()
        except EOFError:
            self._process.join()
            raise WorkerDiedError(_exit_description(self._process.exitcode)) from None

    def close(self) -> None:
        """Ask the worker to finish, and kill it if it does not within a minute."""
        if self._process.is_alive():
            # a worker that is going away anyway may have closed its end already
            with contextlib.suppress(OSError):
                self._connection.send(None)
            self._process.join(timeout=60)
        self.kill()

    def kill(self) -> None:
        """Stop the worker now (a no-op once it has exited)."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._connection.close()


def run_cases(specs: list[CaseSpec], options: RunOptions) -> Iterator[dict]:
    """Yield each case's results; a case whose worker died is reported with the cause."""
    worker: Worker | None = None
    try:
        for number, spec in enumerate(specs, 1):
            print(f"[{number}/{len(specs)}] {spec.label} on {spec.device}", file=sys.stderr)
            worker = worker or Worker()
            try:
                yield worker.run(spec, options)
            except WorkerDiedError as died:
                worker.kill()
                worker = None
                yield {**asdict(spec), "label": spec.label, "error": str(died), "results": []}
    except BaseException:
        # interrupted (Ctrl-C, say) in the middle of a case: do not wait for it to end
        if worker is not None:
            worker.kill()
            worker = None
        raise
    finally:
        if worker is not None:
            worker.close()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 1 if a contender failed (wrong result or error) or a case died.

    A contender that runs out of memory is a result, not a failure: eager PyTorch cannot
    fit every case of the GPU suite, and ``make bench`` should not fail for it.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(arguments)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lenalign bench: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    repeats = args.repeats or DEFAULT_REPEATS[device]
    if repeats < 1:
        print("lenalign bench: --repeats must be at least 1", file=sys.stderr)
        return 2
    if args.background_load < 0:
        print("lenalign bench: --background-load must be at least 0", file=sys.stderr)
        return 2
    shapes = args.shape or default_shapes(device, args.full)
    specs = [CaseSpec(b, t, v, dtype, device) for b, t, v in shapes]
    options = RunOptions(
        contenders=args.contenders,
        modes=args.modes,
        repeats=repeats,
        row_seconds=ROW_SECONDS[device],
        extra_contenders=tuple(args.extra_contender),
    )
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "command": shlex.join(["lenalign", "bench", *arguments]),
        "started": started.isoformat(timespec="seconds"),
        "seconds": 0.0,
        "device": device,
        "dtype": dtype,
        "repeats": repeats,
        "min_repeats": min(MIN_REPEATS, repeats),
        "row_seconds": options.row_seconds,
        "background_load": args.background_load,
        "cases": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with background_load(args.background_load):
        for case in run_cases(specs, options):
            report["cases"].append(case)
            now = datetime.datetime.now(datetime.timezone.utc)
            report["seconds"] = (now - started).total_seconds()
            # rewritten after every case, so an interrupted run keeps what it measured
            write_json(report, args.out / "bench.json")
            write_markdown(report, args.out / "bench.md")
    print(format_table(report))
    chart_problem = write_chart(report, args.out / "bench.png")
    written = ["bench.json", "bench.md"] + ([] if chart_problem else ["bench.png"])
    print(f"\nwrote {', '.join(written)} to {args.out}")
    if chart_problem:
        print(f"chart not written: {chart_problem}")
    cases = report["cases"]
    failed = any(case["error"] for case in cases) or any(
        row["status"] == "failed" for case in cases for row in case["results"]
    )
    return 1 if failed else 0
