"""The entries' vocab-parallel route: ``vocab_shard=`` given, or DTensor logits.

Every check of the inputs runs on every rank before any collective, and its outcome is
agreed over the group (``vocab_shard.agree``): a bad input raises the same way on all
ranks instead of leaving some waiting in an all-reduce. The route runs eagerly (under
``torch.compile`` it is a graph break): its collectives and host reads are not traced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .checks import fail, is_dtensor
from .layout import RowLayout, accumulate_dtype
from .linear_function import HeadTransform, default_chunk_rows
from .vocab_parallel import ShardedLinearSequenceLogProbs, ShardedSequenceLogProbs
from .vocab_shard import VocabShard, agree, chunk_bounds, dtensor_split, group_rank


def from_dtensor(logits: Any, vocab_shard: object) -> tuple[torch.Tensor, VocabShard | None]:
    """(local logits, their VocabShard) of DTensor logits.

    Shard(-1) on a 1-D mesh (ColwiseParallel with ``use_local_output=False``) is the
    vocab-parallel case; Replicate needs no communication (the local tensor is whole).
    Any other placement would need the logits moved between ranks first: refused. The
    local view is differentiable, so the gradient comes back as a DTensor placed as
    the logits are.
    """
    from torch.distributed.tensor import Replicate, Shard

    if vocab_shard is not None:
        fail("vocab_shard", "None with DTensor logits (their placement says the shard)", "both")
    mesh, placements = logits.device_mesh, tuple(logits.placements)
    if mesh.ndim == 1 and placements == (Replicate(),):
        return logits.to_local(), None
    if mesh.ndim != 1 or placements != (Shard(logits.ndim - 1),):
        fail(
            "logits",
            "a DTensor placed Shard(-1) (vocab-parallel) or Replicate() on a 1-D mesh",
            f"placements {placements} on a {mesh.ndim}-D mesh",
        )
    group = mesh.get_group()
    start, stop = chunk_bounds(logits.shape[-1], mesh.size(), mesh.get_local_rank())
    return logits.to_local(), VocabShard(start, stop, group)


def local_head(
    weight: object, bias: object, shard: object
) -> tuple[object, object, ValueError | None]:
    """This rank's rows of a vocab-split DTensor head (weight and bias placed Shard(0) on
    a 1-D mesh, ``shard`` from ``VocabShard.from_dtensor``) as plain tensors, whose
    gradients flow back as DTensors placed alike; plain tensors pass as they are. A
    DTensor that does not match ``shard`` is returned as it is with the error, for the
    caller to raise inside the agreement, so that every rank raises."""
    try:
        return _local_rows("weight", weight, shard), _local_rows("bias", bias, shard), None
    except ValueError as error:
        return weight, bias, error


def _local_rows(argument: str, value: object, shard: object) -> object:
    if not is_dtensor(value):
        return value
    import torch.distributed as dist

    start, stop, group = dtensor_split(argument, value, 0)
    if not isinstance(shard, VocabShard):
        return value  # the agreement refuses the shard itself, naming vocab_shard
    ranks = dist.get_process_group_ranks(group)
    shard_ranks = dist.get_process_group_ranks(shard.group or dist.group.WORLD)
    if (start, stop) != (shard.start, shard.stop) or ranks != shard_ranks:
        fail(
            "vocab_shard",
            f"the split of {argument}'s DTensor placement (ids {start}:{stop} on this rank "
            f"of the mesh over ranks {ranks}; VocabShard.from_dtensor({argument}) builds it)",
            f"ids {shard.start}:{shard.stop} over ranks {shard_ranks}",
        )
    return value.to_local()


def replicated_local(argument: str, value: object) -> object:
    """The local tensor of a replicated DTensor companion (labels, mask, ...), or ``value``."""
    if not is_dtensor(value):
        return value
    from torch.distributed.tensor import Replicate

    if any(placement != Replicate() for placement in value.placements):
        fail(argument, "a tensor, or a DTensor placed Replicate()", tuple(value.placements))
    return value.to_local()


# what an entry's validation returns: (layout, backend name, local vocabulary width, and
# the linear entry's HeadTransform)
Prepared = tuple[RowLayout, str, int, HeadTransform | None]


def _agreed(
    shard: object,
    rows_name: str,
    prepare: Callable[[], Prepared],
    settings: Callable[[RowLayout], dict[str, int]],
    shared_rows: bool = False,
) -> tuple:
    """``prepare()``'s values and the Agreement, once every rank agrees its inputs are
    sound and ``settings(layout)`` equal (and, with ``shared_rows``, the rows, which are
    the hidden states, bitwise); else the same error on every rank."""
    if not isinstance(shard, VocabShard):
        fail("vocab_shard", "a lenalign.VocabShard or None", type(shard).__name__)
    group_rank(shard.group)
    prepared, error, agreed = None, None, {}
    try:
        prepared = prepare()
        agreed = settings(prepared[0])
    # any failure, not only ValueError: a rank that raised alone would leave the others
    # waiting in the agreement's collective
    except Exception as caught:
        error = caught
    if error is not None:
        agree(shard, None, None, None, {}, error, rows_name)  # raises on every rank
    layout, _, width, _ = prepared
    shared = layout.rows3d if shared_rows else None
    agreement = agree(
        shard, width, layout.targets, layout.cu_seqlens, agreed, None, rows_name, shared
    )
    return (*prepared, agreement)


@torch.compiler.disable
def sharded_sequence_logprobs(
    shard: object, prepare: Callable[[], Prepared], inplace_backward: bool, stats: bool
) -> tuple[tuple[torch.Tensor, ...], RowLayout]:
    """(sum, mean, count, token_logprobs, *four statistics if ``stats``), and the layout,
    of this rank's [.., V_shard] logits; ``prepare`` validates the entry's arguments."""

    def settings(layout: RowLayout) -> dict[str, int]:
        return {
            "return_token_stats": int(stats),
            "logits.dtype": int(accumulate_dtype(layout.rows3d.dtype) == torch.float64),
        }

    layout, backend, _, _, agreement = _agreed(shard, "logits", prepare, settings)
    outputs = ShardedSequenceLogProbs.apply(
        layout.rows3d,
        layout.targets,
        layout.cu_seqlens,
        layout.shift,
        inplace_backward,
        stats,
        backend,
        shard,
        agreement,
    )
    return outputs, layout


@torch.compiler.disable
def sharded_linear_sequence_logprobs(
    shard: object,
    prepare: Callable[[], Prepared],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_rows: int | None,
    stats: bool,
) -> tuple[tuple[torch.Tensor, ...], RowLayout]:
    """As ``sharded_sequence_logprobs``, from this rank's rows ``weight`` of the LM head."""

    def settings(layout: RowLayout) -> dict[str, int]:
        # the backward all-reduces the hidden states' gradient where all three hold
        needs_hidden_grad = layout.rows3d.requires_grad and torch.is_grad_enabled()
        needs_hidden_grad = needs_hidden_grad and shard.reduce_hidden_grad
        return {
            "return_token_stats": int(stats),
            "hidden.dtype": int(accumulate_dtype(layout.rows3d.dtype) == torch.float64),
            "vocab_shard.reduce_hidden_grad": int(shard.reduce_hidden_grad),
            "hidden.requires_grad": int(needs_hidden_grad),
            # a head has a bias on all of its rows or on none
            "bias": int(bias is not None),
        }

    layout, backend, _, transform, agreement = _agreed(
        shard, "weight", prepare, settings, shared_rows=True
    )
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(max(weight.shape[0], 1), weight.element_size())
    outputs = ShardedLinearSequenceLogProbs.apply(
        layout.rows3d,
        weight,
        bias,
        layout.targets,
        layout.cu_seqlens,
        layout.shift,
        chunk_rows,
        transform,
        stats,
        backend,
        shard,
        agreement,
    )
    return outputs, layout
