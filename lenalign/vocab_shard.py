"""``VocabShard``: which slice of the vocabulary this process holds, and the agreement
of every rank on a call's inputs before any collective that could hang.

A vocab-parallel call runs on every rank of a process group at once; each rank holds
the logits (or the LM head's rows) of vocabulary ids ``start:stop``. The shards must
tile [0, V) and every rank must score the same labels with the same settings. One
small all-gather per call (``agree``: 8 int64 per rank and the settings that decide the
collectives' sizes) checks that before the data's all-reduces: a rank whose input is
wrong would otherwise leave the others waiting in a collective it never joins. When
any rank finds its input wrong, every rank raises a ValueError naming the argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .checks import check_bool, check_int, fail

# local target of a counted row whose label lies in another shard: no column index of
# any kernel ever equals it, so the label's one-hot term never fires here
OUTSIDE_SHARD = torch.iinfo(torch.int64).max
# the fields of each rank's record in ``agree``, then room for the entry's settings: the
# record has one size on every rank, also when a rank failed before it knew them
_RECORD = (
    "failed",
    "start",
    "stop",
    "width",
    "rows",
    "max_label",
    "fingerprint",
    "values_fingerprint",
)
_SETTING_SLOTS = 5


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``start:stop`` of a vocabulary split over ``group``.

    Args:
        start, stop: the vocabulary ids this rank's logits (or head rows) hold;
            0 <= start <= stop. Over the group the shards must tile [0, V) without
            overlap (in any rank order); an empty shard (start == stop) is allowed.
        group: the process group the vocabulary is split over; None: the default group.
        reduce_hidden_grad: for ``linear_sequence_logprobs``, all-reduce (sum) the
            hidden states' gradient over the group, so that every rank holds the full
            gradient; False leaves each rank's part, for frameworks that reduce it
            themselves (tensor parallelism's input all-reduce in the backward).
    """

    start: int
    stop: int
    group: Any = field(default=None, compare=False)
    reduce_hidden_grad: bool = True

    def __post_init__(self) -> None:
        check_int("vocab_shard.start", self.start, minimum=0)
        check_int("vocab_shard.stop", self.stop, minimum=self.start)
        check_bool("vocab_shard.reduce_hidden_grad", self.reduce_hidden_grad)

    @property
    def width(self) -> int:
        """The number of vocabulary ids this rank holds."""
        return self.stop - self.start

    @classmethod
    def from_vocab(
        cls, vocab_size: int, group: Any = None, reduce_hidden_grad: bool = True
    ) -> VocabShard:
        """This rank's shard of ``vocab_size`` ids split as ``torch.chunk`` and DTensor's
        ``Shard`` split a dimension: ceil(V / world) ids per rank in rank order, the
        last shards shorter or empty."""
        check_int("vocab_size", vocab_size, minimum=1)
        rank, world = group_rank(group), dist.get_world_size(group)
        return cls(*chunk_bounds(vocab_size, world, rank), group, reduce_hidden_grad)

    @classmethod
    def from_dtensor(cls, weight: Any, reduce_hidden_grad: bool = True) -> VocabShard:
        """This rank's shard of a vocab-split LM head: ``weight`` the head's [V, H]
        weight as a DTensor placed Shard(0) on a 1-D mesh (what ``ColwiseParallel`` on
        ``lm_head`` makes of it), its rows split as DTensor splits them, ``group`` the
        mesh's. Pass ``weight`` itself, the DTensor, to ``linear_sequence_logprobs``
        with this shard.

        Raises:
            ValueError: naming ``weight``, for anything but a DTensor placed Shard(0)
                on a 1-D mesh (an FSDP2 shard on a 2-D mesh, a replicated head).
        """
        start, stop, group = dtensor_split("weight", weight, 0)
        return cls(start, stop, group, reduce_hidden_grad)


def dtensor_split(argument: str, tensor: Any, dim: int) -> tuple[int, int, Any]:
    """(start, stop, group) of this rank's part of DTensor ``tensor`` placed Shard(dim)
    on a 1-D mesh: the part torch.chunk would give it.

    Raises:
        ValueError: naming ``argument``, for a plain tensor or any other placement.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        fail(argument, f"a DTensor placed Shard({dim}) on a 1-D mesh", type(tensor).__name__)
    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    if mesh.ndim != 1 or placements != (Shard(dim),):
        fail(
            argument,
            f"a DTensor placed Shard({dim}) on a 1-D mesh",
            f"placements {placements} on a {mesh.ndim}-D mesh",
        )
    start, stop = chunk_bounds(tensor.shape[dim], mesh.size(), mesh.get_local_rank())
    return start, stop, mesh.get_group()


def chunk_bounds(size: int, world: int, index: int) -> tuple[int, int]:
    """(start, stop) of part ``index`` of ``size`` split in ``world`` parts as torch.chunk."""
    per_part = math.ceil(size / world)
    start = min(index * per_part, size)
    return start, min(start + per_part, size)


def group_rank(group: Any) -> int:
    """This process's rank in ``group`` (None: the default group), checked to exist."""
    if not dist.is_available() or not dist.is_initialized():
        fail("vocab_shard", "an initialized torch.distributed process group", "none")
    rank = dist.get_rank(group)
    if rank < 0:
        fail("vocab_shard.group", "a process group this process belongs to", group)
    return rank


def collective_device(group: Any) -> torch.device:
    """Where a group's small bookkeeping tensors live: the current GPU for nccl."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def value_fingerprint(values: torch.Tensor, rows_per_chunk: int = 1024) -> int:
    """An int64 digest of a float tensor's bits, row by row of its last dimension: equal
    values give equal digests on every rank, whatever their strides. Chunked, so that
    the int64 working copy stays small."""
    rows = values.detach().reshape(-1, values.shape[-1])
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
    bits = rows.contiguous().view(integer)
    columns = torch.arange(1, bits.shape[-1] + 1, device=bits.device)
    digest = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.shape[0], rows_per_chunk):
        chunk = bits[start : start + rows_per_chunk].to(torch.int64)
        row_digests = (chunk * columns).sum(-1)
        weights = torch.arange(start, start + chunk.shape[0], device=bits.device) % 1_000_003
        digest = digest * 31 + (row_digests * (weights + 1)).sum()
    return int(digest)


def fingerprint(*tensors: torch.Tensor) -> int:
    """An int64 digest of integer tensors: equal inputs give equal digests on every rank
    (integer sums wrap identically), different ones almost never collide."""
    digest = torch.zeros((), dtype=torch.int64, device=tensors[0].device)
    for salt, tensor in enumerate(tensors, start=1):
        flat = tensor.reshape(-1).to(torch.int64)
        weights = torch.arange(flat.numel(), device=flat.device) % 1_000_003 + salt
        digest = digest * 31 + (flat * weights).sum()
    return int(digest)


@dataclass(frozen=True)
class Agreement:
    """What ``agree`` established: the vocabulary, the starts of the non-empty shards in
    order, and this shard's place among them (-1 if empty), which decides ties of the
    argmax across shards."""

    vocab: int
    order: int
    shard_starts: tuple[int, ...]


def agree(
    shard: VocabShard,
    width: int | None,
    targets: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    settings: dict[str, int],
    error: Exception | None,
    rows_name: str,
    shared_values: torch.Tensor | None = None,
) -> Agreement:
    """Check every rank's call against the others', the same way on every rank.

    ``width`` is this rank's local vocabulary (logits.shape[-1] or weight.shape[0]),
    ``targets`` its [N] row targets (global ids, -1 not counted), ``settings`` the
    arguments that decide the collectives' sizes and count (by argument name: they must
    be equal on every rank), ``shared_values`` the float input that must be the same on
    every rank (the hidden states of the linear entry; None for logits, which differ by
    design), ``error`` what its local checks raised, if anything (then the others may be
    None): it is raised again on this rank, and the others raise it
    as a ValueError (a RuntimeError if it was not one) naming the rank.
    """
    group = shard.group
    device = collective_device(group)
    record = torch.zeros(len(_RECORD) + _SETTING_SLOTS, dtype=torch.int64)
    record[0] = error is not None
    record[1], record[2] = shard.start, shard.stop
    if error is None:
        counted = targets[targets >= 0]
        record[3], record[4] = width, targets.numel()
        record[5] = int(counted.max()) if counted.numel() else -1
        record[6] = fingerprint(targets, cu_seqlens)
        record[7] = 0 if shared_values is None else value_fingerprint(shared_values)
        values = torch.tensor(list(settings.values()), dtype=torch.int64)
        record[len(_RECORD) : len(_RECORD) + len(settings)] = values
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(record, device=device) for _ in range(world)]
    dist.all_gather(gathered, record.to(device), group=group)
    fields = (*_RECORD, *settings)
    table = [dict(zip(fields, (int(v) for v in r.cpu()), strict=False)) for r in gathered]
    if any(row["failed"] for row in table):
        reports = [None] * world
        report = None if error is None else (isinstance(error, ValueError), str(error))
        dist.all_gather_object(reports, report, group=group)
        if error is not None:
            raise error
        rank, (is_value_error, message) = next(
            (r, report) for r, report in enumerate(reports) if report is not None
        )
        kind = ValueError if is_value_error else RuntimeError
        raise kind(f"{message} (on rank {rank}; every rank of the group raises)")
    return _check_table(table, group_rank(group), rows_name, tuple(settings))


def _check_table(
    table: list[dict[str, int]], me: int, rows_name: str, settings: tuple[str, ...]
) -> Agreement:
    """The checks of the gathered records, identical on every rank."""
    for name in settings:
        if len({row[name] for row in table}) > 1:
            fail(
                name,
                "the same value on every rank of the vocab_shard group",
                [r[name] for r in table],
            )
    # empty shards hold no id: they neither tile nor order anything
    held = [r for r in range(len(table)) if table[r]["stop"] > table[r]["start"]]
    shards = sorted(held, key=lambda r: table[r]["start"])
    covered = 0
    for rank in shards:
        start, stop = table[rank]["start"], table[rank]["stop"]
        if start != covered:
            what = "overlap" if start < covered else "a gap"
            fail(
                "vocab_shard",
                "shards that tile [0, V) without gaps or overlaps",
                f"{what} at vocabulary id {min(start, covered)} (rank {rank} holds "
                f"{start}:{stop}; shards by rank: "
                f"{[(row['start'], row['stop']) for row in table]})",
            )
        covered = stop
    vocab = covered
    if vocab < 1:
        fail("vocab_shard", "shards that hold at least one vocabulary id", "all empty")
    for rank, row in enumerate(table):
        if row["width"] != row["stop"] - row["start"]:
            fail(
                rows_name,
                f"{row['stop'] - row['start']} vocabulary entries on rank {rank} (its "
                f"vocab_shard {row['start']}:{row['stop']})",
                row["width"],
            )
    if len({(row["rows"], row["fingerprint"]) for row in table}) > 1:
        fail(
            "labels",
            "the same labels, mask and cu_seqlens on every rank of the vocab_shard group",
            f"rows {[row['rows'] for row in table]} and differing contents",
        )
    if len({row["values_fingerprint"] for row in table}) > 1:
        fail(
            "hidden",
            "the same hidden states on every rank of the vocab_shard group (each rank "
            "projects them onto its rows of the head)",
            "differing contents (bitwise digests differ between ranks)",
        )
    max_label = table[0]["max_label"]
    if max_label >= vocab:
        fail(
            "labels",
            f"values in [0, {vocab}) at counted positions (V from vocab_shard)",
            max_label,
        )
    starts = tuple(table[rank]["start"] for rank in shards)
    # an empty shard never holds a row's maximum: its order is never read
    order = shards.index(me) if me in shards else -1
    return Agreement(vocab=vocab, order=order, shard_starts=starts)


def local_targets(targets: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """[N] targets as this shard's kernels take them: label - start inside the shard,
    OUTSIDE_SHARD for a counted label elsewhere, -1 where not counted."""
    inside = (targets >= shard.start) & (targets < shard.stop)
    shifted = torch.where(inside, targets - shard.start, OUTSIDE_SHARD)
    return torch.where(targets >= 0, shifted, -1)
