"""Backend selection: which implementation of the row kernels runs for a given tensor.

A backend is a module with ``row_logprob_forward``, ``row_logprob_backward`` and
``segment_reduce`` of one contract: ``lenalign.kernels`` (Triton) or
``lenalign.torch_backend`` (pure PyTorch).
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import torch_backend
from .checks import check_choice

BACKENDS = ("auto", "triton", "torch")
# devices for which Triton compiles kernels
TRITON_DEVICE_TYPES = ("cuda", "xpu")


def _triton_kernels() -> tuple[ModuleType | None, str]:
    """Import lenalign.kernels; return (module, "") or (None, the reason it is unavailable)."""
    try:
        from . import kernels
    except ImportError as error:
        return None, f"Triton is not importable ({error})"
    return kernels, ""


def triton_runs_on(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on tensors of ``device``, and why not."""
    kernels, reason = _triton_kernels()
    if kernels is None:
        return False, reason
    if device.type in TRITON_DEVICE_TYPES:
        return True, ""
    if device.type == "cpu" and kernels.INTERPRETED:
        return True, ""
    return False, (
        f"Triton runs on {'/'.join(TRITON_DEVICE_TYPES)} tensors, or on CPU tensors when "
        f"TRITON_INTERPRET=1 is set before lenalign is imported; the inputs are on {device}"
    )


def select_backend(backend: str, device: torch.device) -> str:
    """Resolve the ``backend`` argument of ``sequence_logprobs``: "triton" or "torch".

    The operators take the name, not the module: a registered operator's arguments are
    tensors and plain values.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "torch" or device.type == "meta":
        return "torch"
    usable, reason = triton_runs_on(device)
    if usable and (backend == "triton" or device.type != "cpu"):
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend: 'triton' cannot run here: {reason}")
    return "torch"


def backend_kernels(name: str) -> ModuleType:
    """The module of row kernels that a resolved backend name stands for."""
    if name == "triton":
        kernels, reason = _triton_kernels()
        if kernels is None:
            raise ValueError(f"backend: 'triton' cannot run here: {reason}")
        return kernels
    return torch_backend
