"""Run the trainer and SIGKILL it in the middle of writing a checkpoint, once per run asked.

    python crash_run.py STEP MOMENT CONFIG_JSON [MOMENT CONFIG_JSON ...]

Each CONFIG_JSON holds a TrainConfig's fields. For each pair this process forks a child
(the imports, most of a run's time, happen once, before the forks) that trains with that
config and kills itself while writing the checkpoint of STEP, at MOMENT:

- ``trainer_state``: after the weights and tokenizer, half of trainer_state.pt written;
- ``rename``: every file written and synced, before the rename into place;
- ``replace``: between the two renames that replace an existing checkpoint-STEP.

The kill comes from wrapping ``torch.save`` and ``os.replace`` in the child, so the
product code has no test hooks. It prints how each child ended, and exits 0 only if
every one died of SIGKILL. Used by test_train_crash.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch
from kill_points import half_written_state_save

from lenalign.train import TrainConfig, train

CHILD_TIMEOUT_S = 60  # a child still running then dies of SIGALRM, which reads as a failure


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run_and_die(config_file: str, moment: str, step: int) -> None:
    prefix = f".checkpoint-{step}."
    replace = os.replace

    def killing_replace(src, dst, *args, **kwargs):
        if moment == "rename" and Path(src).name.startswith(prefix + "partial"):
            die()
        replace(src, dst, *args, **kwargs)
        if moment == "replace" and Path(dst).name.startswith(prefix + "replaced"):
            die()

    if moment == "trainer_state":
        torch.save = half_written_state_save(torch.save, step, die)
    os.replace = killing_replace
    train(TrainConfig(**json.loads(Path(config_file).read_text())))


def main() -> int:
    step, runs = int(sys.argv[1]), sys.argv[2:]
    ended = {}
    for moment, config_file in zip(runs[::2], runs[1::2], strict=True):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.alarm(CHILD_TIMEOUT_S)
            try:
                run_and_die(config_file, moment, step)
                print(f"{moment}: no kill came at step {step}", file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        status = os.waitpid(pid, 0)[1]
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        ended[moment] = "SIGKILL" if killed else f"wait status {status}"
    print(json.dumps(ended))
    return 0 if all(how == "SIGKILL" for how in ended.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
