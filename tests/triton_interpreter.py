"""Whether Triton's interpreter can run lenalign's kernels with the numpy installed.

Triton 3.6's interpreter fails every kernel with numpy 2.4 or newer (a loop bound reaches
``range`` as a one-element array, which numpy 2.4 no longer turns into an int); 3.7
fixed it, and compiled kernels are not affected. A module of its own, not conftest.py:
several conftest modules share that name, so tests import this one.
"""

from __future__ import annotations

import importlib.metadata
import os

from packaging.version import Version


def interpreter_problem() -> str | None:
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
