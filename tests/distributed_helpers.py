"""Multi-process tests: spawn a gloo group on 127.0.0.1, bounded in time.

``run_world(worker, world_size, *args)`` starts ``world_size`` fresh processes, joins
them in a gloo process group over the loopback interface, runs
``worker(rank, world_size, *args)`` on each and returns their results in rank order.
A worker that raises fails the test with its traceback; a group that has not finished
by the deadline (a hung collective, a dead rank) is killed and fails the test, never
the CI run. The worker must be a module-level function (the children import it).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
# the variables torchrun sets for its workers: an outer launcher's would make a child
# launch join the wrong group
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")
# a collective that waits longer than this raises inside the worker
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_environment() -> dict[str, str]:
    """Environment variables that keep gloo on the loopback interface, one thread each."""
    return {
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }


def child_environment() -> dict[str, str]:
    """The environment of a child interpreter: offline, this checkout importable, gloo on
    the loopback interface, no outer torchrun's variables."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **loopback_environment())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))
    for name in TORCHRUN_VARIABLES:
        env.pop(name, None)
    return env


def torchrun_command(world_size: int, *script: str) -> list[str]:
    """``python -m torch.distributed.run`` of ``script`` on ``world_size`` local ranks."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", *script,
    ]  # fmt: skip


def run_bounded(
    command: list[str], timeout: float, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``command`` in ``child_environment()`` (with ``environment`` added), its output
    in ``stdout``; one still running after ``timeout`` seconds is killed with every
    process it started (it runs in a session of its own) and fails the test."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_environment() | (environment or {}),
        text=True,
        start_new_session=True,
    )
    try:
        output = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        pytest.fail(f"{command[1:4]} still runs after {timeout:.0f} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output)


def _child(
    worker: Callable, rank: int, world_size: int, store_path: str, args: tuple, results
) -> None:
    os.environ.update(loopback_environment())
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        value = worker(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_world(worker: Callable, world_size: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """``worker(rank, world_size, *args)`` on ``world_size`` gloo processes; their results."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as scratch:
        store_path = str(Path(scratch) / "store")
        processes = [
            context.Process(
                target=_child, args=(worker, rank, world_size, store_path, args, results)
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        received: dict[int, tuple[bool, Any]] = {}
        try:
            while len(received) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"world of {world_size} did not finish in {timeout:.0f} s; ranks "
                        f"done: {sorted(received)}"
                    )
                try:
                    rank, ok, payload = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [
                        r
                        for r, p in enumerate(processes)
                        if p.exitcode not in (None, 0) and r not in received
                    ]
                    if dead:
                        raise AssertionError(
                            f"rank(s) {dead} died (exit codes "
                            f"{[processes[r].exitcode for r in dead]})"
                        ) from None
                    continue
                received[rank] = (ok, payload)
        finally:
            for process in processes:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
                    process.join()
    failures = [f"rank {r}:\n{payload}" for r, (ok, payload) in sorted(received.items()) if not ok]
    if failures:
        raise AssertionError("\n".join(failures))
    return [torch.load(io.BytesIO(received[r][1]), weights_only=False) for r in range(world_size)]
