"""The public entry points: validate, normalize the layout, pick the backend, run the
registered operator (function.py, linear_function.py).

What runs here is what ``torch.compile`` traces: checks of shapes, dtypes and devices,
and tensor ops without host synchronizations. Whatever reads the data (label range,
packed boundaries, the kernels) runs inside the operators."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .backends import select_backend
from .checks import (
    check_bool,
    check_int,
    fail,
    is_dtensor,
    positive_finite,
    refuse_forward_ad,
)
from .function import SequenceLogProbsUnderFunc
from .layout import RowLayout, build_layout, build_linear_layout, overlaps_itself
from .linear_function import HeadTransform, LinearSequenceLogProbsUnderFunc, default_chunk_rows
from .outputs import SequenceLogProbs, TokenStats
from .sharded_api import (
    from_dtensor,
    local_head,
    replicated_local,
    sharded_linear_sequence_logprobs,
    sharded_sequence_logprobs,
)
from .vocab_shard import VocabShard


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    return_token_logprobs: bool = False,
    return_token_stats: bool = False,
    inplace_backward: bool = False,
    vocab_shard: VocabShard | None = None,
    backend: str = "auto",
) -> SequenceLogProbs:
    """Per-sequence sum and mean of the label log-likelihoods, fused and memory-lean.

    Args:
        logits: [B, T, V] padded batch, or with ``cu_seqlens`` [N, V] / [1, N, V] packed
            tokens; float16, bfloat16, float32 or float64; any row strides (views such as
            ``logits[:, :-1]`` are not copied).
        labels: integer tensor of shape ``logits.shape[:-1]``.
        mask: optional bool or integer tensor of the labels' shape; a position counts iff
            its label != ``ignore_index`` and the mask is true there.
        ignore_index: label value that is never counted.
        shift: Hugging Face causal-LM convention: the label at position t is scored with
            the logits at t - 1 of the same sequence; first positions never count.
        cu_seqlens: [S + 1] int32/int64 boundaries of packed sequences (FlashAttention's
            varlen convention); None for a padded batch (S = B).
        return_token_logprobs: also return per-position log-probabilities.
        return_token_stats: also return per-position entropy, mean logit, top-1 hit and
            log of the summed squared probabilities (a TokenStats), from the same pass
            over the logits; they carry no gradient.
        inplace_backward: write the gradient into the logits' own storage during the
            backward instead of a new [.., V] buffer. The logits are overwritten: do not
            use them after ``backward()``.
        vocab_shard: vocab-parallel: this rank holds the logits of vocabulary ids
            ``vocab_shard.start:stop`` ([.., stop - start]), the labels are global ids,
            the same on every rank of ``vocab_shard.group``, and every rank gets the same,
            full results (docs/distributed.md). DTensor logits placed Shard(-1) on a 1-D
            mesh take this route by themselves, their gradient a DTensor placed alike.
        backend: "triton", "torch" or "auto" (triton where the logits live on a device
            Triton supports, else the pure-PyTorch backend).

    Returns:
        SequenceLogProbs(sum [S], mean [S], count [S] int64, token_logprobs or None,
        token_stats or None); float fields are float64 for float64 logits and float32
        otherwise.

    Raises:
        ValueError: naming the argument, for wrong shapes, dtypes or devices, a label
            outside [0, V) at a counted position, or malformed ``cu_seqlens``.
    """
    refuse_forward_ad("sequence_logprobs", logits=logits)
    if is_dtensor(logits):
        logits, vocab_shard = from_dtensor(logits, vocab_shard)
        labels, mask = replicated_local("labels", labels), replicated_local("mask", mask)
        cu_seqlens = replicated_local("cu_seqlens", cu_seqlens)

    def prepare() -> tuple[RowLayout, str, int, None]:
        check_bool("return_token_logprobs", return_token_logprobs)
        check_bool("return_token_stats", return_token_stats)
        check_bool("inplace_backward", inplace_backward)
        sharded = vocab_shard is not None
        layout = build_layout(logits, labels, mask, ignore_index, shift, cu_seqlens, sharded)
        if inplace_backward:
            _check_inplace(layout.rows3d)
        return layout, select_backend(backend, logits.device), layout.rows3d.shape[-1], None

    if vocab_shard is not None:
        outputs, layout = sharded_sequence_logprobs(
            vocab_shard, prepare, inplace_backward, return_token_stats
        )
        return _package(outputs[:4], outputs[4:], layout, return_token_logprobs)
    layout, backend_name, _, _ = prepare()
    inputs = (
        layout.rows3d,
        layout.targets,
        layout.cu_seqlens,
        layout.shift,
        inplace_backward,
        return_token_stats,
        backend_name,
    )
    outputs = _call(torch.ops.lenalign.sequence_logprobs, SequenceLogProbsUnderFunc, inputs)
    stats = outputs[6:10] if return_token_stats else ()
    return _package(outputs[:4], stats, layout, return_token_logprobs)


def linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    return_token_logprobs: bool = False,
    return_token_stats: bool = False,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    chunk_rows: int | None = None,
    vocab_shard: VocabShard | None = None,
    backend: str = "auto",
) -> SequenceLogProbs:
    """``sequence_logprobs`` of ``hidden @ weight.T + bias``, without the [N, V] logits.

    The LM head is applied to the counted rows only, a chunk of ``chunk_rows`` rows at a
    time; each chunk's logits go through the same row kernels as ``sequence_logprobs``
    and are freed, and the backward recomputes them chunk by chunk. Peak memory is one
    chunk of logits instead of all of them (plus, over several chunks, a float32 sum of
    the weight's gradient for 16-bit weights).

    Args:
        hidden: [B, T, H] hidden states entering the LM head (padded), or with
            ``cu_seqlens`` [N, H] / [1, N, H] packed; float16, bfloat16, float32 or
            float64; any strides.
        weight: [V, H] LM-head weight (``lm_head.weight``), the hidden states' dtype and
            device.
        labels, mask, ignore_index, shift, cu_seqlens, return_token_logprobs,
            return_token_stats, backend: as for ``sequence_logprobs``, with ``hidden`` in
            place of the logits (the statistics are of the scaled and capped logits).
        bias: optional [V] LM-head bias, the hidden states' dtype and device.
        logit_scale: the logits are multiplied by it (Cohere's ``config.logit_scale``);
            a finite number > 0.
        logit_softcap: then, if given, capped as ``softcap * tanh(z / softcap)`` (Gemma
            2's ``config.final_logit_softcapping``); a finite number > 0 or None.
        chunk_rows: counted rows projected at a time; default: as many as fit 256 MiB of
            logits (1046 rows at V = 128256 in bf16).
        vocab_shard: vocab-parallel: ``weight`` (and ``bias``) are this rank's rows
            ``vocab_shard.start:stop`` of the head, ``hidden`` and the labels the same on
            every rank (checked, bitwise); results as for ``sequence_logprobs``. The
            hidden states' gradient is summed over the group when
            ``vocab_shard.reduce_hidden_grad``, else it is this rank's part
            (docs/distributed.md). Tensor parallelism: ``weight`` (and ``bias``) may be
            the head's DTensor placed Shard(0) on a 1-D mesh, as it is, with
            ``vocab_shard=VocabShard.from_dtensor(weight)``; its gradient is then a
            DTensor placed alike.

    Returns:
        SequenceLogProbs as ``sequence_logprobs``; differentiable in ``hidden``,
        ``weight`` and ``bias``. The logits are ``F.linear(hidden, weight, bias)``, then
        scaled and capped, in the hidden states' dtype and op by op as the models write
        it, so that they are the bits the model's own head would produce.

    Raises:
        ValueError: naming the argument, as ``sequence_logprobs``, and for a weight or
            bias whose shape, dtype or device does not match the hidden states, hidden
            states that differ between the ranks of ``vocab_shard.group``, and a DTensor
            head whose split is not ``vocab_shard``'s (or without ``vocab_shard``: a
            Shard(0) DTensor may be an FSDP2 shard as well as a vocab split).
    """
    refuse_forward_ad("linear_sequence_logprobs", hidden=hidden, weight=weight, bias=bias)
    head_error = None
    if vocab_shard is not None:
        # a DTensor head split over the vocabulary: its local rows (checked against the
        # shard inside the agreement, so that every rank raises)
        weight, bias, head_error = local_head(weight, bias, vocab_shard)

    def prepare() -> tuple[RowLayout, str, int, HeadTransform]:
        if head_error is not None:
            raise head_error
        check_bool("return_token_logprobs", return_token_logprobs)
        check_bool("return_token_stats", return_token_stats)
        scale = positive_finite("logit_scale", logit_scale)
        softcap = None if logit_softcap is None else positive_finite("logit_softcap", logit_softcap)
        transform = HeadTransform(scale, softcap)
        if chunk_rows is not None:
            check_int("chunk_rows", chunk_rows, minimum=1)
        sharded = vocab_shard is not None
        layout = build_linear_layout(
            hidden, weight, bias, labels, mask, ignore_index, shift, cu_seqlens, sharded
        )
        return layout, select_backend(backend, hidden.device), weight.shape[0], transform

    if vocab_shard is not None:
        outputs, layout = sharded_linear_sequence_logprobs(
            vocab_shard, prepare, weight, bias, chunk_rows, return_token_stats
        )
        return _package(outputs[:4], outputs[4:], layout, return_token_logprobs)
    layout, backend_name, _, transform = prepare()
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], weight.element_size())
    # eagerly the backward keeps only the counted rows' hidden states; a compiled graph
    # (and meta tensors) need shapes that do not depend on the data, so keep them all
    compact = not torch.compiler.is_compiling() and hidden.device.type != "meta"
    inputs = (
        layout.rows3d,
        weight,
        bias,
        layout.targets,
        layout.cu_seqlens,
        layout.shift,
        chunk_rows,
        transform.scale,
        transform.softcap,
        compact,
        return_token_stats,
        backend_name,
    )
    outputs = _call(
        torch.ops.lenalign.linear_sequence_logprobs, LinearSequenceLogProbsUnderFunc, inputs
    )
    stats = outputs[6:10] if return_token_stats else ()
    return _package(outputs[:4], stats, layout, return_token_logprobs)


def _call(operator: Callable, under_func: type[torch.autograd.Function], inputs: tuple) -> tuple:
    """The registered operator; or, while a torch.func transform (grad, vjp, ...) runs this
    call, its autograd.Function twin (function.SequenceLogProbsUnderFunc says why)."""
    if (
        not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is not None
    ):
        return under_func.apply(*inputs)
    return operator(*inputs)


def _check_inplace(logits3d: torch.Tensor) -> None:
    """``inplace_backward`` writes each gradient element over its logit: refuse logits
    whose elements share memory, where the writes would read each other's results."""
    if overlaps_itself(logits3d):
        fail(
            "inplace_backward",
            "logits whose elements do not share memory (not expanded or as_strided "
            "over themselves)",
            f"strides {logits3d.stride()} for shape {tuple(logits3d.shape)}",
        )


def _package(
    outputs: tuple, stats: tuple, layout: RowLayout, return_token_logprobs: bool
) -> SequenceLogProbs:
    """The user's SequenceLogProbs of an operator's (sum, mean, count, token_logprobs) and
    the four statistics (empty when not asked for)."""
    seq_sum, seq_mean, seq_count, token_logprobs = outputs
    return SequenceLogProbs(
        sum=seq_sum,
        mean=seq_mean,
        count=seq_count,
        token_logprobs=token_logprobs.reshape(layout.label_shape)
        if return_token_logprobs
        else None,
        token_stats=TokenStats(*(values.reshape(layout.label_shape) for values in stats))
        if stats
        else None,
    )
