"""The measuring instruments of the bench: a clock, peak-memory probes, the machine's quiet.

Each measures one thing about a call, on CUDA or on the host, and knows nothing of the
contenders or the report: ``lenalign bench``, the pytest-benchmark suite and the scripts
in benchmarks/ share them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import time
from collections.abc import Callable

import torch

MiB = 1 << 20
# bigger than any GPU's L2, so a zero_() of it evicts the previous call's data
CACHE_FLUSH_BYTES = 256 * MiB


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CPU work is already done when a call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Times one call: CUDA events after an L2 flush on a GPU, the wall clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._flush = (
            torch.empty(CACHE_FLUSH_BYTES, dtype=torch.uint8, device=device)
            if device.type == "cuda"
            else None
        )

    def time(self, call: Callable[[], object]) -> float:
        """Seconds that ``call`` took; its result is freed only after the clock stops."""
        if self._flush is not None:
            self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            result = call()
            end.record()
            end.synchronize()
            del result
            return start.elapsed_time(end) / 1e3
        started = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - started
        del result
        return elapsed


def copy_bandwidth(device: torch.device, clock: Clock) -> float:
    """Bytes per second (read + write) of a large copy on the device, the bandwidth yardstick."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    seconds = statistics.median(clock.time(lambda: target.copy_(source)) for _ in range(7))
    return 2 * nbytes / seconds


class HostPeakMemory:
    """Peak resident memory of this process above its level at ``start()`` (Linux).

    PyTorch's CPU allocations bypass any allocator statistics, so the kernel's own count
    is read: writing 5 to /proc/self/clear_refs resets the high-water mark VmHWM to the
    current resident size, after malloc_trim has handed freed heap pages back, so that the
    baseline holds live data only and memory reused from earlier calls is seen again.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError as error:
            self.reason = f"cannot reset the peak resident size ({error}); needs Linux"
        libc_name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(libc_name) if libc_name else None
        self._malloc_trim = getattr(libc, "malloc_trim", None)
        self._base = 0

    @staticmethod
    def _status_bytes(key: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} missing from /proc/self/status")

    def start(self) -> None:
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        self._base = self._status_bytes("VmRSS")

    def stop(self) -> int:
        return self._status_bytes("VmHWM") - self._base


class CudaPeakMemory:
    """Peak bytes allocated through PyTorch's CUDA allocator above the level at ``start()``."""

    reason: str | None = None

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base = 0

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self._base


def peak_memory_probe(device: torch.device) -> HostPeakMemory | CudaPeakMemory:
    """The peak-memory measure of the device: allocator statistics on CUDA, else the host's."""
    return CudaPeakMemory(device) if device.type == "cuda" else HostPeakMemory()


class OtherCpuUse:
    """CPU time that other processes used during a measurement, in cores (Linux).

    Timings on a shared machine are only as good as its quiet: when another process takes
    one of two cores, PyTorch's parallel regions wait for it, and a call can take many
    times as long. The busy time of all CPUs (/proc/stat) minus this process's own, over
    the elapsed time, says how much of the machine others took meanwhile.
    """

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[float, float, float] | None = None

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(value) for value in stat.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        busy = (user + nice + system + irq + softirq + steal) / self._tick
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return None
        busy, own, wall = (b - a for a, b in zip(self._start, end, strict=True))
        return max(0.0, (busy - own) / wall)
