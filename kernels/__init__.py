"""Device code of lenalign (shipped as ``lenalign.kernels``): Triton kernels and launchers.

TRITON_INTERPRET is read when the kernels below are defined, so ``INTERPRETED`` tells
whether they run on CPU tensors through Triton's interpreter.

This folder is the checkout's top-level ``kernels/``. Where the checkout's root is on
``sys.path`` (``python -m pytest``, ``python -c``, a script or a notebook started there),
Python would find it as the top-level module ``kernels`` before an installed package of
that name, such as Hugging Face's ``kernels`` that transformers imports. Imported under
that name, this module hands the name over to the installed package, and defines nothing
of its own. With none installed, ``kernels`` becomes what Python makes of a folder that
is no package of its own: an empty namespace, with no file and nothing to import from it
(``from kernels import x`` raises ImportError), which transformers' availability check
reads as "not installed".
"""

import importlib.machinery
import importlib.util
import os
import sys


def _is_this_folder(directory: str, here: str) -> bool:
    """Whether ``directory`` is ``here``, by identity rather than by name: a bind mount or
    a case-insensitive file system reaches one folder by several names."""
    try:
        return os.path.samefile(directory or os.curdir, here)
    except OSError:  # a sys.path entry that does not exist, or a zip file
        return False


def _hand_over_the_top_level_name() -> None:
    """Put the installed ``kernels`` in ``sys.modules`` in place of this module.

    The import system returns whatever ``sys.modules["kernels"]`` holds once this
    module's code has run, so the installed package is what ``import kernels`` yields.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [entry for entry in sys.path if not _is_this_folder(entry, root)]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    found = spec.origin if spec is not None else None
    if found and os.path.exists(found) and os.path.samefile(found, __file__):
        spec = None  # this file again, by another path
    if spec is None or spec.loader is None:
        # no package of that name: an empty namespace, as for a folder without __init__.py
        spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        spec.submodule_search_locations = []
    installed = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = installed
    if spec.loader is not None:
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
