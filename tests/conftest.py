"""Test set-up: Triton kernels run under the interpreter where no GPU is present.

TRITON_INTERPRET is read when the kernels are defined, so it is set here, before any
test module imports lenalign, and only where CUDA is absent (on a GPU the kernels are
compiled and tested for real).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
