"""Test set-up: Triton kernels run under the interpreter where no GPU is present.

TRITON_INTERPRET is read when the kernels are defined, so it is set here, before any
test module imports lenalign, and only where CUDA is absent (on a GPU the kernels are
compiled and tested for real).

Triton 3.6's interpreter fails every kernel with numpy 2.4 or newer (a loop bound reaches
``range`` as a one-element array, which numpy 2.4 no longer turns into an int:
``InterpreterError: TypeError('only 0-dimensional arrays can be converted to Python
scalars')``); its compiled kernels are not affected. Such a set-up stops here, saying so,
rather than failing each Triton test with that message.
"""

import importlib.metadata
import os

import pytest
import torch
from packaging.version import Version

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run lenalign's kernels here, or None."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        triton = Version(importlib.metadata.version("triton"))
    except importlib.metadata.PackageNotFoundError:
        return None  # the Triton tests skip themselves
    numpy = Version(importlib.metadata.version("numpy"))
    if triton < Version("3.7") and numpy >= Version("2.4"):
        return (
            f"Triton {triton}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy "
            f"{numpy}: it needs numpy < 2.4 (pip install 'numpy<2.4'), or Triton >= 3.7; "
            "compiled kernels on a GPU are not affected"
        )
    return None


def pytest_configure(config: pytest.Config) -> None:
    problem = _interpreter_problem()
    if problem:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)
