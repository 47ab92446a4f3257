"""The fault the crash tests inject: a process SIGKILLed halfway through trainer_state.pt.

Shared by crash_run.py (one process) and torchrun_run.py (one rank of a launch); both
import it as a sibling script. torch is passed in, not imported, so that importing this
module stays free of torch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path


def half_written_state_save(save: Callable, step: int, die: Callable[[], None]) -> Callable:
    """A ``torch.save`` that, for trainer_state.pt of checkpoint ``step``'s temporary
    directory, writes the first half of its bytes and then calls ``die``; every other
    save goes to ``save`` unchanged."""
    prefix = f".checkpoint-{step}."

    def killing_save(obj, f, *args, **kwargs):
        target = Path(f) if isinstance(f, (str, os.PathLike)) else None
        if target and target.name == "trainer_state.pt" and target.parent.name.startswith(prefix):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(target, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()
        return save(obj, f, *args, **kwargs)

    return killing_save
