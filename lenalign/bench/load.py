"""A background load for ``lenalign bench --background-load N``: N processes that each
keep one core busy while the cases run, as another job on a shared machine would.

CPU users rarely have the machine to themselves. A kernel that splits its work into many
short parallel regions waits, at each region's end, for the thread that the scheduler
took off its core; one that runs few long regions degrades in proportion to the cores it
lost. This load makes the difference measurable and reproducible.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

# Spins in pure Python (one core, no memory traffic) and stops by itself once its parent
# is gone, so that a killed benchmark leaves no spinner behind. The parent's pid comes as
# an argument: read at the spinner's start, it could already be the reaper's.
SPINNER = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


@contextlib.contextmanager
def background_load(processes: int) -> Iterator[list[subprocess.Popen]]:
    """Run ``processes`` busy processes for the duration of the ``with`` block."""
    spinners: list[subprocess.Popen] = []
    try:
        for _ in range(processes):
            # a session of its own: Ctrl-C on the benchmark does not reach the spinners,
            # which the finally below stops
            spinners.append(
                subprocess.Popen(
                    [sys.executable, "-c", SPINNER, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
