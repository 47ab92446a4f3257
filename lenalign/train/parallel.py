"""``lenalign train`` on several processes: the ranks of a torchrun launch, and what they share.

``distributed="ddp"`` or ``"fsdp"`` runs one process per rank, launched by torchrun
(``torchrun --nproc-per-node N -m lenalign.cli train --distributed ddp ...``), which
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``joined_world`` checks
that environment and joins the process group (gloo on CPU, nccl on CUDA with each rank on
``cuda:LOCAL_RANK``) for the run, with ``distributed_timeout`` as the longest wait of a
collective; ``World`` is the rank's view of it: its share of a micro-batch, sums over
the ranks, and values that rank 0 decides for all. The policy itself, wrapped in DDP or
sharded with FSDP2, is ``lenalign.train.sharding``'s.

Every rank takes the same global micro-batch of ``batch_size`` pairs (the order is a
function of the step, ``micro_batch_indices``) and scores its contiguous share of it, so
no sampler is needed and the shares of one step are the single process's batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..checks import fail
from ..outputs import SequenceLogProbs
from .config import TrainConfig
from .dataset import PairLogProbs, PreferenceData
from .models import resolve_device
from .step import precompute_reference

# what torchrun sets in each rank's environment
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

Value = TypeVar("Value")


@dataclass(frozen=True)
class World:
    """This process's place in a run: its rank among ``size`` and its device.

    ``mode`` is the config's ``distributed``; with "none" the world is this process
    alone and every method is the single-process identity.
    """

    mode: str
    device: torch.device
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        """Whether the run spans a process group (ddp or fsdp, even of one rank)."""
        return self.mode != "none"

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the only one that writes to output_dir and prints."""
        return self.rank == 0

    def share(self, indices: Sequence[int]) -> list[int]:
        """This rank's contiguous, equal share of a global micro-batch's pair indices."""
        size = len(indices) // self.size
        return list(indices[self.rank * size : (self.rank + 1) * size])

    def sums(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (in float64), element by element."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def gather(self, value: Value) -> list[Value]:
        """Every rank's ``value`` (any picklable object, CPU tensors) in rank order."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def from_main(self, decide: Callable[[], Value]) -> Value:
        """What ``decide()`` returns on rank 0, on every rank; only rank 0 calls it.

        Whatever ``decide`` raises is raised again on rank 0, and on the other ranks as a
        ValueError (a RuntimeError if it was not one) with its message, so that no rank
        waits for a value that never comes.
        """
        if not self.distributed:
            return decide()
        box: list[Any] = [None]
        failure: Exception | None = None
        if self.main:
            try:
                box[0] = (True, decide())
            except Exception as error:  # any: the other ranks wait on this broadcast
                failure = error
                box[0] = (False, (isinstance(error, ValueError), str(error)))
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if failure is not None:
            raise failure
        if not ok:
            is_value_error, message = value
            kind = ValueError if is_value_error else RuntimeError
            raise kind(f"{message} (on rank 0)")
        return value

    def barrier(self) -> None:
        """Wait until every rank is here (no-op in a single process)."""
        if self.distributed:
            dist.barrier()


def world_of(config: TrainConfig) -> World:
    """The World that ``config`` and the environment describe, checked; nothing joined yet.

    Raises:
        ValueError: naming ``distributed`` for ddp/fsdp without torchrun's environment
            (or "none" in a torchrun launch of several ranks), ``device`` for a device a
            rank cannot pick, and ``batch_size`` when it does not split evenly over the
            ranks.
    """
    size = os.environ.get("WORLD_SIZE")
    if config.distributed == "none":
        if size is not None and size.isdigit() and int(size) > 1:
            fail(
                "distributed",
                f"'ddp' or 'fsdp' in a torchrun launch of WORLD_SIZE={size} ranks (with "
                "'none' every rank would train alone and write the same output_dir)",
                repr(config.distributed),
            )
        return World("none", resolve_device(config.device))
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        fail(
            "distributed",
            f"{config.distributed!r} to run under torchrun, which sets "
            f"{', '.join(TORCHRUN_VARIABLES)} (torchrun --nproc-per-node N -m lenalign.cli "
            "train ...)",
            f"an environment without {', '.join(missing)}",
        )
    try:
        rank, size, local_rank = (int(os.environ[n]) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        fail("distributed", "integer RANK, WORLD_SIZE and LOCAL_RANK", "other values")
    if not 0 <= rank < size:
        fail("distributed", f"0 <= RANK < WORLD_SIZE ({size})", f"RANK={rank}")
    if config.batch_size % size:
        fail(
            "batch_size",
            f"a multiple of the {size} ranks, each scoring an equal share",
            config.batch_size,
        )
    return World(config.distributed, _rank_device(config.device, local_rank), rank, size)


def _rank_device(name: str, local_rank: int) -> torch.device:
    """A rank's device: ``cuda:LOCAL_RANK`` for auto (with CUDA) or cuda, else cpu."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    if device.type != "cpu":
        fail("device", "auto, cpu or cuda under distributed (a rank takes cuda:LOCAL_RANK)", name)
    return device


@contextmanager
def joined_world(config: TrainConfig) -> Iterator[World]:
    """The run's World, its process group joined for the block and left after it.

    A process group that the caller already initialized is used as it is and left
    initialized. The group's timeout, ``distributed_timeout`` seconds, bounds every
    collective: a rank whose peer died fails within it even where no launcher stops it.
    """
    world = world_of(config)
    if world.distributed and world.device.type == "cuda":
        torch.cuda.set_device(world.device)  # the device of NCCL's object collectives
    if not world.distributed or dist.is_initialized():
        if world.distributed and dist.get_world_size() != world.size:
            fail(
                "distributed",
                f"a process group of WORLD_SIZE={world.size}",
                f"one of {dist.get_world_size()} ranks already initialized",
            )
        yield world
        return
    dist.init_process_group(
        "nccl" if world.device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=config.distributed_timeout),
        device_id=world.device if world.device.type == "cuda" else None,
    )
    try:
        yield world
    finally:
        dist.destroy_process_group()


def shared_reference(
    world: World,
    model: torch.nn.Module,
    data: PreferenceData,
    batch_size: int,
    pad: int,
    amp: torch.dtype | None,
    fused_head: bool,
) -> PairLogProbs:
    """``precompute_reference`` of ``data``, its batches split over the ranks.

    Each rank scores a contiguous run of the very batches one process would score (so
    the values are the single process's), and every rank receives them all. ``model``
    is the unsharded initial policy.
    """
    if not world.distributed:
        return precompute_reference(model, data, batch_size, pad, amp, fused_head)
    n_batches = -(-len(data) // batch_size)
    first = n_batches * world.rank // world.size * batch_size
    last = n_batches * (world.rank + 1) // world.size * batch_size
    part = PreferenceData(data.pairs[first:last], data.rows[first:last])
    local = None
    if len(part):
        chosen, rejected = precompute_reference(model, part, batch_size, pad, amp, fused_head)
        # gathered as pickles: CPU tensors, which every rank can load
        local = tuple(SequenceLogProbs(*(f.cpu() for f in s[:3])) for s in (chosen, rejected))
    parts = [p for p in world.gather(local) if p is not None]

    def stacked(side: int) -> SequenceLogProbs:
        columns = zip(*(part[side][:3] for part in parts), strict=True)
        return SequenceLogProbs(*(torch.cat(column).to(world.device) for column in columns))

    return stacked(0), stacked(1)
