"""Each rank of a torchrun launch: ``lenalign train`` runs in turn, a fault on request.

    python -m torch.distributed.run --nproc-per-node 2 ... torchrun_run.py PLAN_JSON

PLAN_JSON holds ``{"watch": DIR or null, "runs": [{"argv": [...], "kill": KILL,
"master_port": PORT}, ...]}``. Each run is ``lenalign.cli.main(["train", *argv])`` in this
process, one after the other (the imports, most of a launch's time, happen once), its
process group's store on rank 0 at PORT when given. The ranks other than 0 refuse,
with a RuntimeError, every write under ``watch`` (an audit hook sees each file opened
for writing, directory made, renamed or removed from Python), so a write that only
rank 0 should make fails the launch.

KILL, when not null, is ``{"rank": r, "moment": m, "step": s}``: rank r SIGKILLs itself

- ``trainer_state``: while writing checkpoint-s, after the weights and tokenizer, half of
  trainer_state.pt written (as crash_run.py does in one process);
- ``backward``: in the middle of optimizer step s, as the backward of its first
  micro-batch starts (the other ranks are then in or on their way to its all-reduce).

The kills come from wrapping ``torch.save`` and ``torch.Tensor.backward``, so the product
code has no test hooks. Rank r prints ``torchrun_run: run N done on rank r`` after each
run that returned 0, and the time just before it kills itself. Used by
test_train_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from kill_points import half_written_state_save

# audit events that change the file system, and where their path argument is
WRITING_EVENTS = {"os.mkdir": 0, "os.rename": 0, "os.replace": 0, "os.remove": 0}
WRITING_EVENTS |= {"os.rmdir": 0, "shutil.rmtree": 0, "os.truncate": 0, "os.symlink": 1}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def die() -> None:
    # the time, for the test to measure how long the other ranks outlive this one
    print(f"torchrun_run: rank {os.environ['RANK']} dies at {time.time()}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def refuse_writes_under(root: str, rank: int):
    """An audit hook that raises on any change to the file system under ``root``."""
    root = os.path.realpath(root)

    def under(path: object) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        return os.path.realpath(os.fsdecode(path)).startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wxa+") if mode else bool(flags & WRITE_FLAGS)
        elif event in WRITING_EVENTS:
            path, writing = args[WRITING_EVENTS[event]], True
        else:
            return
        if writing and under(path):
            raise RuntimeError(f"rank {rank} wrote {path} ({event}); only rank 0 writes")

    return hook


def refuse_native_saves_under(root: str, rank: int) -> None:
    """torch.save and safetensors open their files in native code, unseen by the audit
    hook: wrap both (and transformers' own reference to safetensors' save, which
    save_pretrained calls) to refuse a path under ``root`` likewise."""
    import safetensors.torch
    import torch
    import transformers.modeling_utils

    guard = refuse_writes_under(root, rank)

    def refusing(save, argument: int):
        def call(*args, **kwargs):
            guard("open", (args[argument], "wb", 0))
            return save(*args, **kwargs)

        return call

    torch.save = refusing(torch.save, 1)
    safetensors.torch.save_file = refusing(safetensors.torch.save_file, 1)
    modeling = transformers.modeling_utils
    modeling.safe_save_file = refusing(modeling.safe_save_file, 1)


def arm(kill: dict) -> None:
    """Make this process SIGKILL itself at the moment ``kill`` names."""
    import torch  # here, as in main, so that the write guard imports without torch

    moment, step = kill["moment"], kill["step"]
    if moment == "trainer_state":
        torch.save = half_written_state_save(torch.save, step, die)
    elif moment == "backward":
        backward, calls = torch.Tensor.backward, [0]
        micro_batches = kill["micro_batches"]

        def killing_backward(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == (step - 1) * micro_batches + 1:
                die()
            return backward(self, *args, **kwargs)

        torch.Tensor.backward = killing_backward
    else:
        raise ValueError(f"moment: unknown {moment!r}")


def main() -> int:
    from lenalign import cli

    plan = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    if plan.get("watch") and rank != 0:
        sys.addaudithook(refuse_writes_under(plan["watch"], rank))
        refuse_native_saves_under(plan["watch"], rank)
    for number, run in enumerate(plan["runs"]):
        if "master_port" in run:
            # a process group of its own per run: a group joined again through torchrun's
            # store would find the previous group's addresses there, and a rank that
            # starts its next run first would dial the other's closed port
            os.environ["MASTER_PORT"] = str(run["master_port"])
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        kill = run.get("kill")
        if kill and kill["rank"] == rank:
            arm(kill)
        code = cli.main(["train", *run["argv"]])
        if kill and kill["rank"] == rank:
            print(f"rank {rank}: no kill came at {kill}", file=sys.stderr)
            return 1
        if code:
            return code
        print(f"torchrun_run: run {number} done on rank {rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
