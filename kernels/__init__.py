"""Device code of lenalign (shipped as ``lenalign.kernels``): Triton kernels and launchers.

TRITON_INTERPRET is read when the kernels below are defined, so ``INTERPRETED`` tells
whether they run on CPU tensors through Triton's interpreter.

This folder is the checkout's top-level ``kernels/``. Where the checkout's root is on
``sys.path`` (``python -m pytest``, ``python -c``, a script or a notebook started there),
Python would find it as the top-level module ``kernels`` before an installed package of
that name, such as Hugging Face's ``kernels`` that transformers imports. Imported under
that name, this module hands the name over to the installed package, or to none
(ModuleNotFoundError), and defines nothing of its own.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hand_over_the_top_level_name() -> None:
    """Put the installed ``kernels`` in ``sys.modules`` in place of this module.

    The import system returns whatever ``sys.modules["kernels"]`` holds once this
    module's code has run, so the installed package is what ``import kernels`` yields.
    """
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    # '' stands for the working directory
    elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named 'kernels' ({root}/kernels is lenalign's device code, "
            "importable as lenalign.kernels)",
            name="kernels",
        )
    installed = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = installed
    spec.loader.exec_module(installed)


if __name__ == "kernels":
    _hand_over_the_top_level_name()
else:
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
