"""The TRL this integration needs: an ImportError naming the extra when it is missing,
a warning when its version is not the tested one.

It is imported first by the package's ``__init__``, before any module that imports trl,
so that a missing trl is reported as the extra to install rather than as a bare
``ModuleNotFoundError`` from deep inside a module.
"""

from __future__ import annotations

import importlib
import warnings

# the TRL releases this integration was written against and tested with (the [trl] extra
# pins the same range); DPOTrainer's loss path changes between minor releases
TESTED_TRL_SERIES = "1.16"
INSTALL_HINT = "pip install 'lenalign[trl]'"


def require_trl() -> str:
    """Import trl and return its version; warn when it is outside the tested series.

    Raises:
        ImportError: trl (or peft's companion, transformers) is not installed; the message
            names the extra that installs it.
    """
    try:
        trl = importlib.import_module("trl")
    except ImportError as error:
        raise ImportError(
            f"lenalign.integrations.trl needs TRL {TESTED_TRL_SERIES}.x, which is not "
            f"installed ({error}); install the extra: {INSTALL_HINT}"
        ) from error
    version = getattr(trl, "__version__", "unknown")
    if not _in_series(version, TESTED_TRL_SERIES):
        warnings.warn(
            f"lenalign.integrations.trl was tested with TRL {TESTED_TRL_SERIES}.x, found "
            f"{version}: DPOTrainer's loss and metrics may have changed; "
            f"{INSTALL_HINT} installs the tested release",
            UserWarning,
            stacklevel=3,
        )
    return version


def _in_series(version: str, series: str) -> bool:
    """Whether ``version`` ("1.16.0", "1.16.1.dev0") is a release of ``series`` ("1.16")."""
    return version.split(".")[:2] == series.split(".")
