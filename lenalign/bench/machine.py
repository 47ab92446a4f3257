"""The machine and software that a bench figure comes from, recorded with every run."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from .contenders import CONTENDER_DISTRIBUTIONS


def machine_description(device: torch.device) -> dict:
    """The device and software the figures come from."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                models = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
            name = models[0] if models else name
        except OSError:
            pass
        name = f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {
        "device": device.type,
        "name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # what a third-party contender runs depends on its version (TRL's, for one)
        "packages": {dist: _installed_version(dist) for dist in CONTENDER_DISTRIBUTIONS},
    }


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
