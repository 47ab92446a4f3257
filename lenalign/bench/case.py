"""One benchmark case: the eager reference, the checks and the measurements.

A case is one logits shape and dtype on one device (``workload.CaseSpec``). ``run_case``
builds the preference batch, computes the eager reference, then for each mode and
contender: runs it once and checks sum, mean and (with backward) the logits gradient
against the reference, and only if they agree measures its peak memory above the inputs
and its median time. It runs in the worker process that ``lenalign bench`` starts
(``worker_main``), so that the host memory it reads is this process's alone; the
pytest-benchmark suite reuses the same pieces.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection

import torch

from lenalign import reference_sequence_logprobs

from .contenders import CONTENDERS, Contender, load_extra_contender
from .machine import machine_description
from .probes import (
    Clock,
    CudaPeakMemory,
    HostPeakMemory,
    OtherCpuUse,
    copy_bandwidth,
    peak_memory_probe,
    synchronize,
)
from .workload import (
    FORWARD,
    FORWARD_BACKWARD,
    CaseSpec,
    SequenceFn,
    StepOutput,
    Workload,
    make_workload,
)

# rows compared at a time: two 64 MiB float32 buffers whatever the logits' size
COMPARE_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class RunOptions:
    """What to run in each case and how long to time it.

    Each contender and mode is timed ``repeats`` times, or fewer (but at least
    ``MIN_REPEATS``) once the timed calls add up to ``row_seconds``: on a loaded CPU a
    call can take ten times its usual time, and the run must still end.
    """

    contenders: tuple[str, ...]
    modes: tuple[str, ...]
    repeats: int
    row_seconds: float
    extra_contenders: tuple[str, ...] = ()


MIN_REPEATS = 3


@dataclass(frozen=True)
class Tolerance:
    """Elementwise bound |got - want| <= atol + rtol * |want|."""

    rtol: float
    atol: float


def tolerances(dtype: torch.dtype) -> dict[str, Tolerance]:
    """Tolerances of sum, mean and gradient against the eager reference.

    With fp32 logits every contender computes in fp32, so results agree to about 1e-6.
    With 16-bit logits the gradient is rounded to that dtype, where two right answers can
    differ by one ulp (2^-8 relative), and TRL takes the log-softmax in that dtype, which
    moves a sum of thousands of tokens by about 1e-4 relative; a wrong result (a missed
    shift or mask, a gradient not divided by the count) is off by far more than either.
    """
    wide = dtype in (torch.float32, torch.float64)
    outputs = Tolerance(rtol=1e-4, atol=1e-4) if wide else Tolerance(rtol=1e-3, atol=1e-3)
    grad = Tolerance(rtol=1e-4, atol=1e-6) if wide else Tolerance(rtol=1.6e-2, atol=1e-5)
    return {"sum": outputs, "mean": outputs, "grad": grad}


@dataclass
class Reference:
    """The eager reference's sums and means (on the device) and gradient (on the host)."""

    sum: torch.Tensor
    mean: torch.Tensor
    grad: torch.Tensor


def eager_reference(workload: Workload) -> Reference:
    """Run the eager reference one sequence at a time.

    Sequences are independent, so this is the eager result of the whole batch; one at a
    time it needs a B-th of eager's memory, which leaves a reference to check against even
    where eager on the whole batch does not fit. The gradient is kept on the host, so it
    does not count against the device memory of the contenders; in page-locked memory
    beside a GPU, which the checks read back a chunk at a time at the link's full speed
    (pageable memory would be staged through a bounce buffer at a fraction of it).
    """
    logits = workload.logits.detach()
    pinned = logits.device.type == "cuda"
    grad = torch.empty(logits.shape, dtype=logits.dtype, device="cpu", pin_memory=pinned)
    sums, means = [], []
    for index in range(logits.shape[0]):
        row = slice(index, index + 1)
        piece = logits[row].requires_grad_(True)
        out = reference_sequence_logprobs(
            piece, workload.labels[row], workload.mask[row], shift=True
        )
        loss = workload.weight_sum[row] * out.sum + workload.weight_mean[row] * out.mean
        (piece_grad,) = torch.autograd.grad(loss.sum(), piece)
        grad[index].copy_(piece_grad[0], non_blocking=pinned)
        sums.append(out.sum.detach())
        means.append(out.mean.detach())
    if pinned:
        torch.cuda.synchronize(logits.device)  # the copies were asynchronous
    return Reference(sum=torch.cat(sums), mean=torch.cat(means), grad=grad)


def make_step(fn: SequenceFn, mode: str, workload: Workload) -> Callable[[], StepOutput]:
    """The call that is checked, measured and timed for one contender in one mode.

    Forward only runs under no_grad on logits that do not require grad, as a reference
    model's log-likelihoods are computed; forward + backward returns the gradient through
    ``torch.autograd.grad``, as it would flow on into the LM head, rather than accumulating
    it into ``.grad`` (which would copy a gradient written over the logits).
    """
    if mode == FORWARD:

        def forward() -> StepOutput:
            with torch.no_grad():
                seq_sum, seq_mean = fn(workload.logits.detach())
            return seq_sum, seq_mean, None

        return forward

    def forward_backward() -> StepOutput:
        seq_sum, seq_mean = fn(workload.logits)
        loss = (workload.weight_sum * seq_sum + workload.weight_mean * seq_mean).sum()
        (grad,) = torch.autograd.grad(loss, workload.logits)
        return seq_sum.detach(), seq_mean.detach(), grad

    return forward_backward


def worst_ratio(got: torch.Tensor, want: torch.Tensor, tolerance: Tolerance) -> float:
    """Largest |got - want| / (atol + rtol * |want|): at most 1 within tolerance.

    Computed in float32 (float64 for float64 inputs), in which the difference of two close
    values is exact, a chunk of rows at a time in two buffers reused from chunk to chunk:
    a multi-GiB gradient then needs no multi-GiB temporary, and no fresh pages (which on a
    CPU cost more than the arithmetic). NaN or a shape mismatch count as infinitely far.
    """
    if got.shape != want.shape:
        return math.inf
    compute = torch.float64 if torch.float64 in (got.dtype, want.dtype) else torch.float32
    width = got.shape[-1] if got.dim() > 1 else max(got.numel(), 1)
    got_rows, want_rows = got.detach().reshape(-1, width), want.reshape(-1, width)
    rows = max(1, min(got_rows.shape[0], COMPARE_CHUNK_ELEMENTS // width))
    error = torch.empty((rows, width), dtype=compute, device=got.device)
    scale = torch.empty_like(error)
    worst = 0.0
    for got_chunk, want_chunk in zip(got_rows.split(rows), want_rows.split(rows), strict=True):
        count = got_chunk.shape[0]
        chunk_error, chunk_scale = error[:count], scale[:count]
        # non-blocking: from page-locked memory the copy goes by DMA in the source dtype and
        # converts on the device (a blocking one converts on the host, through pageable
        # staging); the max below waits for it
        chunk_scale.copy_(want_chunk, non_blocking=True)
        torch.sub(got_chunk, chunk_scale, out=chunk_error)
        chunk_scale.abs_().mul_(tolerance.rtol).add_(tolerance.atol)
        chunk_error.abs_().div_(chunk_scale).nan_to_num_(nan=math.inf)
        worst = max(worst, float(chunk_error.max()))
    return worst


def check(
    out: StepOutput, reference: Reference, dtype: torch.dtype
) -> tuple[dict[str, float], str | None]:
    """Compare a step's outputs with the reference: (worst ratio per quantity, failure)."""
    seq_sum, seq_mean, grad = out
    pairs = {"sum": (seq_sum, reference.sum), "mean": (seq_mean, reference.mean)}
    if grad is not None:
        pairs["grad"] = (grad, reference.grad)
    limits = tolerances(dtype)
    ratios = {name: worst_ratio(got, want, limits[name]) for name, (got, want) in pairs.items()}
    wrong = [
        f"{name} is off by up to {ratio:.3g}x the tolerance "
        f"(rtol {limits[name].rtol:g}, atol {limits[name].atol:g})"
        for name, ratio in ratios.items()
        if not ratio <= 1.0
    ]
    return ratios, ("wrong result: " + "; ".join(wrong)) if wrong else None


def _out_of_memory(error: BaseException) -> bool:
    # the CPU allocator reports exhaustion as a plain RuntimeError
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def measure(
    contender: Contender,
    mode: str,
    workload: Workload,
    reference: Reference,
    clock: Clock,
    probe: HostPeakMemory | CudaPeakMemory,
    options: RunOptions,
) -> dict:
    """Check one contender in one mode, then (if right) measure its memory and time.

    The first call compiles or autotunes where the contender does, so it is both the
    check and the warm-up; its duration is kept as ``first_call_s``. Then one call under
    the memory probe, then the timed calls. A contender that writes into the
    logits gets the original logits for the check; the later calls see what it wrote,
    which changes the values but not the work, and the logits are restored afterwards.
    """
    row: dict = {"contender": contender.name, "mode": mode, "status": "ok", "reason": None}
    device = workload.logits.device
    try:
        if contender.overwrites_logits:
            workload.keep_pristine()
        step = make_step(contender.build(workload), mode, workload)
        started = time.perf_counter()
        out = step()
        synchronize(device)
        row["first_call_s"] = time.perf_counter() - started
        row["check"], wrong = check(out, reference, workload.logits.dtype)
        del out
        if wrong:
            return {**row, "status": "failed", "reason": wrong}
        if probe.reason is None:
            probe.start()
            out = step()
            row["peak_bytes"] = probe.stop()
            del out
        times: list[float] = []
        least = min(MIN_REPEATS, options.repeats)
        others = OtherCpuUse()
        others.start()
        while len(times) < options.repeats and (
            len(times) < least or sum(times) < options.row_seconds
        ):
            times.append(clock.time(step))
        row["other_cpu_cores"] = others.stop()
        row["times_s"] = times
        row["median_s"] = statistics.median(times)
    except Exception as error:  # any failure of a contender is a result, not a crash
        status = "oom" if _out_of_memory(error) else "failed"
        row = {**row, "status": status, "reason": f"{type(error).__name__}: {error}"}
    finally:
        if contender.overwrites_logits:
            workload.restore()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_derived(case: dict) -> None:
    """Add the figures computed from the measurements: ratios to eager and bandwidth.

    The byte floor is what any implementation must move: the forward reads the counted
    rows' logits once; the backward reads them again and writes the whole gradient, the
    uncounted rows' zeros included (the gradient has the logits' shape):
    ``element size * V * counted rows`` forward, ``element size * V * (2 * counted rows +
    positions)`` with the backward.
    """
    eager = {
        row["mode"]: row
        for row in case["results"]
        if row["contender"] == "eager" and row["status"] == "ok"
    }
    row_bytes = case["element_size"] * case["vocab"]
    floors = {
        FORWARD: row_bytes * case["counted_rows"],
        FORWARD_BACKWARD: row_bytes * (2 * case["counted_rows"] + case["positions"]),
    }
    for row in case["results"]:
        if row["status"] != "ok":
            continue
        base = eager.get(row["mode"])
        peak = row.get("peak_bytes")
        floor_bytes = floors[row["mode"]]
        row["floor_bytes"] = floor_bytes
        row["floor_bytes_per_s"] = floor_bytes / row["median_s"]
        row["floor_pct_of_copy"] = 100 * row["floor_bytes_per_s"] / case["copy_bytes_per_s"]
        row["time_vs_eager"] = row["median_s"] / base["median_s"] if base else None
        row["peak_vs_logits"] = peak / case["logits_bytes"] if peak is not None else None
        row["peak_vs_eager"] = (
            peak / base["peak_bytes"]
            if base and peak is not None and base.get("peak_bytes")
            else None
        )


def resolve_contenders(options: RunOptions) -> list[Contender]:
    """The contenders of a run, extras last."""
    chosen = [CONTENDERS[name] for name in options.contenders]
    return chosen + [load_extra_contender(spec) for spec in options.extra_contenders]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_case(spec: CaseSpec, options: RunOptions) -> dict:
    """Measure every selected contender in every mode on one case; a JSON-ready dict."""
    device = torch.device(spec.device)
    clock = Clock(device)
    bandwidth = copy_bandwidth(device, clock)
    workload = make_workload(spec)
    reference = eager_reference(workload)
    probe = peak_memory_probe(device)
    contenders = resolve_contenders(options)
    logits = workload.logits
    case = {
        **asdict(spec),
        "label": spec.label,
        "positions": spec.batch * spec.steps,
        "counted_rows": workload.counted_rows,
        "element_size": logits.element_size(),
        "logits_bytes": logits.numel() * logits.element_size(),
        "copy_bytes_per_s": bandwidth,
        "memory_note": probe.reason,
        "machine": machine_description(device),
        "error": None,
        "results": [],
    }
    for mode in options.modes:
        for contender in contenders:
            if mode not in contender.modes:
                continue
            reason = contender.unavailable(device)
            if reason is not None:
                row = {"contender": contender.name, "mode": mode, "status": "skipped"}
                case["results"].append({**row, "reason": reason})
                continue
            row = measure(contender, mode, workload, reference, clock, probe, options)
            case["results"].append(row)
            shown = f"{row['median_s'] * 1e3:.1f} ms" if row["status"] == "ok" else row["status"]
            _progress(f"  {spec.label}  {mode:<16} {contender.name:<24} {shown}")
    add_derived(case)
    return case


def _die_with_parent() -> None:
    """Have Linux send this process SIGTERM when its parent dies.

    A benchmark parent stopped by ``timeout`` or SIGKILL runs no cleanup, and a worker
    left behind would hold the GPU, or both CPU cores, for minutes.
    """
    if sys.platform != "linux":
        return
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        pr_set_pdeathsig = 1
        ctypes.CDLL(libc_name).prctl(pr_set_pdeathsig, signal.SIGTERM)


def worker_main(connection: Connection) -> None:
    """Entry point of the worker process: run the cases the parent sends until it sends None."""
    _die_with_parent()
    # dynamo reports each graph break of the reference's argument checks as a warning;
    # they are expected and would bury the progress lines
    torch._logging.set_logs(dynamo=logging.ERROR)
    while (message := connection.recv()) is not None:
        spec, options = message
        connection.send(run_case(spec, options))
    connection.close()
