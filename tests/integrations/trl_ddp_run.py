"""One rank of a torchrun launch of DPO trainers on the tiny models (for
test_trl_distributed.py).

``python -m torch.distributed.run --nproc-per-node N trl_ddp_run.py PLAN`` where PLAN is
a JSON file ``{"out": DIR, "runs": [{"name", "trainer", "overrides"}, ...]}``: each rank
trains every run in turn (one launch pays the imports of torch, transformers and TRL
once for all of them) and writes ``DIR/<name>-rank<r>.pt`` with its final parameters,
its log history and what the run was actually distributed over, so that the test can
tell a real DDP run from N independent single-process ones.

``trainer`` is "lenalign" (LenalignDPOTrainer) or "trl" (TRL's DPOTrainer);
``overrides`` are DPOConfig fields on top of trl_helpers.config_kwargs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer
from trl_helpers import make_trainer, preference_dataset

from lenalign.integrations.trl import LenalignDPOConfig, LenalignDPOTrainer

TRAINERS = {
    "lenalign": (LenalignDPOTrainer, LenalignDPOConfig),
    "trl": (DPOTrainer, DPOConfig),
}


def run(out: Path, name: str, trainer: str, overrides: dict[str, Any], n_pairs: int) -> None:
    """Train one run on this rank and write what the test compares."""
    trainer_cls, config_cls = TRAINERS[trainer]
    dpo = make_trainer(
        trainer_cls,
        config_cls,
        out / name,
        train_dataset=preference_dataset(n_pairs),
        **overrides,
    )
    dpo.train()
    state = dpo.accelerator.state
    rank = state.process_index
    result = {
        "state_dict": {
            key: value.detach().clone()
            for key, value in dpo.accelerator.unwrap_model(dpo.model).state_dict().items()
        },
        "log_history": dpo.state.log_history,
        "world_size": state.num_processes,
        "rank": rank,
        "distributed_type": str(state.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        # what training ran through: DistributedDataParallel unless DDP was skipped
        "wrapper": type(dpo.model_wrapped).__name__,
        # DDP walks the forward's outputs for the parameters they reach only when True
        "find_unused_parameters": getattr(dpo.model_wrapped, "find_unused_parameters", None),
    }
    torch.save(result, out / f"{name}-rank{rank}.pt")


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    out = Path(plan["out"])
    for entry in plan["runs"]:
        run(out, entry["name"], entry["trainer"], entry["overrides"], plan["n_pairs"])
    if torch.distributed.is_initialized():
        # every rank has written before any leaves, so a late rank is never torn down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
