"""Argument validation and the row layout that both backends consume.

Every input layout is reduced to the same picture: N rows addressed as
``rows3d[r // T, r % T]`` (padded [B, T, .] keeps B and T; packed [N, .] becomes
[1, N, .]), one int64 target per row (-1 where the row is not counted), and segment
boundaries ``cu_seqlens`` over the rows (padded input gets ``arange(B + 1) * T``). The
rows are logits [.., V] for ``sequence_logprobs`` and hidden states [.., H] for
``linear_sequence_logprobs``, whose logits are the rows times the head's weight.

``shift=True`` costs one element of offset in that flat row space: the label at flat
position p is scored by row p - 1, and the first position of every segment is never
counted, so the last row of a segment is never counted either. No logits are copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_bool, check_int, check_local, check_tensor, fail

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


# an FSDP2-sharded head is a Shard(0) DTensor outside its module's forward, as a
# tensor-parallel one is: which it is cannot be told from the tensor, so neither is guessed
_SHARDED_HEAD_HINT = (
    "an FSDP2-sharded LM head read outside its module's forward: score it through "
    "lenalign.distributed.head_logprobs or causal_lm_logprobs, which gather it; a "
    "tensor-parallel head split over the vocabulary: pass it with "
    "vocab_shard=VocabShard.from_dtensor(weight) (docs/distributed.md)"
)


@dataclass(frozen=True)
class RowLayout:
    """The normalized problem: what the autograd Function and the backends see."""

    rows3d: torch.Tensor  # [B, T, V] logits (vocab stride 1) or [B, T, H] hidden states
    targets: torch.Tensor  # [N] int64 target of each row, -1 where the row is not counted
    cu_seqlens: torch.Tensor  # [S + 1] int64 row boundaries of the sequences
    shift: int  # 1 when the label at flat position p is scored by row p - 1, else 0
    label_shape: torch.Size  # shape of token_logprobs: the labels' shape


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype outputs are accumulated and reported in: fp64 for fp64 rows, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rows(argument: str, value: object, packed: bool, feature: str) -> torch.Tensor:
    """Check logits ([.., V]) or hidden states ([.., H]): float dtype, 3-D or packed 2-D."""
    rows = check_tensor(argument, value)
    if rows.dtype not in FLOAT_DTYPES:
        fail(argument, "dtype float16, bfloat16, float32 or float64", rows.dtype)
    if packed:
        if not (rows.dim() == 2 or (rows.dim() == 3 and rows.shape[0] == 1)):
            fail(
                argument,
                f"shape [N, {feature}] or [1, N, {feature}] with cu_seqlens",
                tuple(rows.shape),
            )
    elif rows.dim() != 3:
        fail(
            argument,
            f"shape [B, T, {feature}] (or [N, {feature}] with cu_seqlens)",
            tuple(rows.shape),
        )
    return rows


def _check_companion(
    argument: str, value: object, rows: torch.Tensor, rows_name: str, kind: str
) -> torch.Tensor:
    value = check_tensor(argument, value)
    if kind == "labels" and value.dtype not in INTEGER_DTYPES:
        fail(argument, "an integer dtype", value.dtype)
    if kind == "mask" and value.dtype != torch.bool and value.dtype not in INTEGER_DTYPES:
        fail(argument, "dtype bool or an integer dtype", value.dtype)
    if tuple(value.shape) != tuple(rows.shape[:-1]):
        fail(
            argument, f"shape {tuple(rows.shape[:-1])} ({rows_name}.shape[:-1])", tuple(value.shape)
        )
    if value.device != rows.device:
        fail(argument, f"device {rows.device} (the device of {rows_name})", value.device)
    return value


def _check_cu_seqlens(cu_seqlens: object, device: torch.device, rows_name: str) -> torch.Tensor:
    """The checks of ``cu_seqlens`` that read no data; its values are checked by
    ``row_targets``, inside the operator, where compilers do not trace."""
    cu_seqlens = check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        fail("cu_seqlens", "dtype int32 or int64", cu_seqlens.dtype)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        fail("cu_seqlens", "a 1-D tensor [S + 1] with S >= 0", tuple(cu_seqlens.shape))
    if cu_seqlens.device != device:
        fail("cu_seqlens", f"device {device} (the device of {rows_name})", cu_seqlens.device)
    return cu_seqlens.to(torch.int64)


def _check_bounds(bounds: torch.Tensor, n_rows: int) -> None:
    """The data checks of packed boundaries: 0 first, N last, never decreasing."""
    first, last = int(bounds[0]), int(bounds[-1])
    if first != 0:
        fail("cu_seqlens", "cu_seqlens[0] == 0", f"cu_seqlens[0] == {first}")
    if last != n_rows:
        fail("cu_seqlens", f"cu_seqlens[-1] == {n_rows} (the number of tokens)", last)
    lengths = bounds[1:] - bounds[:-1]
    if bool((lengths < 0).any()):
        where = int(torch.nonzero(lengths < 0)[0, 0])
        fail("cu_seqlens", "non-decreasing values", f"a decrease after index {where}")


@torch.library.custom_op("lenalign::row_targets", mutates_args=())
def row_targets(
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    ignore_index: int,
    vocab: int,
    shift: bool,
    packed: bool,
) -> torch.Tensor:
    """[N] int64 target of each row, -1 where the row is not counted.

    The checks that read the data (packed boundaries, label range) live here, inside a
    registered operator: eager calls run them, compiled graphs call them as one opaque
    node instead of breaking on their host synchronizations.
    """
    n_rows = labels.numel()
    if packed:
        _check_bounds(cu_seqlens, n_rows)
    flat_labels = labels.reshape(n_rows).to(torch.int64)
    counted = flat_labels != ignore_index
    if mask is not None:
        counted &= mask.reshape(n_rows).to(torch.bool)
    if shift:
        # the first position of every segment has no previous row to be scored by
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        segment_start = torch.zeros(n_rows, dtype=torch.bool, device=labels.device)
        segment_start[cu_seqlens[:-1][lengths > 0]] = True
        counted &= ~segment_start

    # vocab < 0: the vocabulary is split over ranks (vocab_shard.agree checks the top)
    out_of_range = flat_labels < 0
    if vocab >= 0:
        out_of_range |= flat_labels >= vocab
    out_of_range &= counted
    if bool(out_of_range.any()):
        position = int(torch.nonzero(out_of_range)[0, 0])
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(position), labels.shape))
        expected = f"in [0, {vocab})" if vocab >= 0 else ">= 0"
        fail(
            "labels",
            f"values {expected} at counted positions (or ignore_index={ignore_index})",
            f"{int(flat_labels[position])} at position {index}",
        )

    targets = torch.where(counted, flat_labels, torch.full_like(flat_labels, -1))
    if shift and n_rows > 0:
        targets = torch.cat([targets[1:], targets.new_full((1,), -1)])
    return targets


@row_targets.register_fake
def _(labels, mask, cu_seqlens, ignore_index, vocab, shift, packed):
    return labels.new_empty(labels.numel(), dtype=torch.int64)


def segment_ids(cu_seqlens: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[N] int64 sequence of each row, from the [S + 1] boundaries."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n_seq = cu_seqlens.numel() - 1
    return torch.repeat_interleave(
        torch.arange(n_seq, device=cu_seqlens.device), lengths, output_size=n_rows
    )


def build_layout(
    logits: object,
    labels: object,
    mask: object,
    ignore_index: int,
    shift: bool,
    cu_seqlens: object,
    sharded: bool = False,
) -> RowLayout:
    """Validate the arguments of ``sequence_logprobs`` and normalize them to a RowLayout.

    ``sharded``: the logits hold one rank's slice of the vocabulary (possibly empty), so
    the labels' upper bound is checked by ``vocab_shard.agree``, not here.
    """
    logits = _check_rows("logits", logits, cu_seqlens is not None, "V")
    if logits.shape[-1] < 1 and not sharded:
        fail("logits", "a vocabulary dimension of size >= 1", tuple(logits.shape))
    vocab = logits.shape[-1]
    # only a non-unit vocab stride forces a copy; row strides stay as they are
    logits3d = logits.unsqueeze(0) if logits.dim() == 2 else logits
    if logits3d.stride(-1) != 1 and vocab > 1:
        logits3d = logits3d.contiguous()
    return _row_layout(
        logits,
        logits3d,
        "logits",
        -1 if sharded else vocab,
        labels,
        mask,
        ignore_index,
        shift,
        cu_seqlens,
    )


def build_linear_layout(
    hidden: object,
    weight: object,
    bias: object,
    labels: object,
    mask: object,
    ignore_index: int,
    shift: bool,
    cu_seqlens: object,
    sharded: bool = False,
) -> RowLayout:
    """Validate the arguments of ``linear_sequence_logprobs``; rows are the hidden states.

    ``sharded``: the weight holds one rank's rows of the head (possibly none), as for
    ``build_layout``.
    """
    hidden = _check_rows("hidden", hidden, cu_seqlens is not None, "H")
    features = hidden.shape[-1]
    weight = check_local("weight", check_tensor("weight", weight), _SHARDED_HEAD_HINT)
    least = 0 if sharded else 1
    if weight.dim() != 2 or weight.shape[0] < least or weight.shape[1] != features:
        fail(
            "weight",
            f"shape [V, {features}] with V >= {least} (H = hidden.shape[-1])",
            tuple(weight.shape),
        )
    if weight.dtype != hidden.dtype:
        fail("weight", f"dtype {hidden.dtype} (the dtype of hidden)", weight.dtype)
    if weight.device != hidden.device:
        fail("weight", f"device {hidden.device} (the device of hidden)", weight.device)
    vocab = weight.shape[0]
    if bias is not None:
        bias = check_local("bias", check_tensor("bias", bias), _SHARDED_HEAD_HINT)
        if tuple(bias.shape) != (vocab,):
            fail("bias", f"shape ({vocab},) (weight.shape[0]) or None", tuple(bias.shape))
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            fail(
                "bias",
                f"dtype {hidden.dtype} on {hidden.device} (those of hidden)",
                f"{bias.dtype} on {bias.device}",
            )
    hidden3d = hidden.unsqueeze(0) if hidden.dim() == 2 else hidden
    return _row_layout(
        hidden,
        hidden3d,
        "hidden",
        -1 if sharded else vocab,
        labels,
        mask,
        ignore_index,
        shift,
        cu_seqlens,
    )


def _row_layout(
    rows: torch.Tensor,
    rows3d: torch.Tensor,
    rows_name: str,
    vocab: int,
    labels: object,
    mask: object,
    ignore_index: int,
    shift: bool,
    cu_seqlens: object,
) -> RowLayout:
    """The checks and the normalization common to both entries.

    ``rows`` is the caller's tensor (the companions must match its shape), ``rows3d`` its
    [B, T, .] view.
    """
    labels = _check_companion("labels", labels, rows, rows_name, "labels")
    if mask is not None:
        mask = _check_companion("mask", mask, rows, rows_name, "mask")
    check_int("ignore_index", ignore_index)
    if not -(2**63) <= ignore_index < 2**63:  # the operators take it as an int64
        fail("ignore_index", "an int64 value", ignore_index)
    check_bool("shift", shift)

    batch, seq_len = rows3d.shape[0], rows3d.shape[1]
    device = rows3d.device
    packed = cu_seqlens is not None
    if packed:
        bounds = _check_cu_seqlens(cu_seqlens, device, rows_name)
    else:
        bounds = torch.arange(batch + 1, device=device, dtype=torch.int64) * seq_len
    targets = torch.ops.lenalign.row_targets(
        labels, mask, bounds, ignore_index, vocab, shift, packed
    )
    return RowLayout(
        rows3d=rows3d,
        targets=targets,
        cu_seqlens=bounds,
        shift=int(shift),
        label_shape=labels.shape,
    )


def overlaps_itself(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` may share memory (an expanded dimension, or
    strides that step back into earlier elements), read from its sizes and strides.

    With the dimensions of size > 1 sorted by stride, the layout is free of overlap when
    each stride exceeds the span of all smaller-stride dimensions, sum (size - 1) * stride;
    that holds for every slice or permutation of a dense tensor.
    """
    span = 0
    for size, stride in sorted(
        (
            (size, stride)
            for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
            if size > 1
        ),
        key=lambda pair: pair[1],
    ):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def rows_to_labels(row_values: torch.Tensor, shift: int) -> torch.Tensor:
    """Move per-row values to the flat label position each row scores (p = r + shift)."""
    if shift == 0 or row_values.numel() == 0:
        return row_values
    return torch.cat([row_values.new_zeros(1), row_values[:-1]])


def labels_to_rows(label_values: torch.Tensor, shift: int) -> torch.Tensor:
    """Inverse of :func:`rows_to_labels`: the value at label position r + shift for row r."""
    if shift == 0 or label_values.numel() == 0:
        return label_values
    return torch.cat([label_values[1:], label_values.new_zeros(1)])
