"""Test set-up: Triton kernels run under the interpreter where no GPU is present.

TRITON_INTERPRET is read when the kernels are defined, so it is set here, before any
test module imports lenalign, and only where CUDA is absent (on a GPU the kernels are
compiled and tested for real).

Triton 3.6's interpreter fails every kernel with numpy 2.4 or newer (a loop bound reaches
``range`` as a one-element array, which numpy 2.4 no longer turns into an int:
``InterpreterError: TypeError('only 0-dimensional arrays can be converted to Python
scalars')``); its compiled kernels are not affected. Such a set-up stops here, saying so,
rather than failing each Triton test with that message (tests/triton_interpreter.py).
"""

import os

import pytest
import torch
from triton_interpreter import interpreter_problem

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    problem = interpreter_problem()
    if problem:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)
