"""Device code of lenalign (shipped as ``lenalign.kernels``): Triton kernels and launchers.

TRITON_INTERPRET is read when the kernels below are defined, so ``INTERPRETED`` tells
whether they run on CPU tensors through Triton's interpreter.
"""

import os

from .backward import row_logprob_backward
from .forward import row_logprob_forward
from .segment import segment_reduce

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = [
    "INTERPRETED",
    "row_logprob_backward",
    "row_logprob_forward",
    "segment_reduce",
]
