"""Vocab-parallel log-likelihoods: each rank holds the logits of vocabulary ids
``start:stop`` (a ``VocabShard``), and all ranks get the same, full results.

Each rank runs the row kernels over its shard, with the label's id made local
(``vocab_shard.local_targets``: a label held elsewhere never matches a column), giving
per row its local max m_r, local sum S_r = sum_v exp(z[v] - m_r) and, where it holds
the label, the label's logit. With m = max_r m_r and S = sum_r S_r exp(m_r - m):

    logsumexp(z) = m + log S,    logprob = (z[y] - m) - log S

so the forward takes two all-reduces of O(N) floats over the group: MAX of m_r, then
SUM of (S_r exp(m_r - m), z[y] or 0) together. The logits are never gathered.

The backward needs no communication for the logits: with the global (m, log S) saved,

    dL/dz[r, v] = c[r] * (1[v == y] - exp((z[v] - m) - log S))

on each rank's own columns, the row backward kernel as it stands (kernels/backward.py),
the label's one-hot term firing only on the rank that holds it. From hidden states h
(z = h W_shard^T + b_shard), each rank's dL/dh = g W_shard is a part of the sum over
shards: it is all-reduced over the group when ``reduce_hidden_grad`` (the default).

The per-token statistics combine the same way (in the second all-reduce): with
a_r = W_r / S_r = log S_r - entropy_r and P_r = S_r exp(m_r - m),

    W = sum_r P_r (a_r + m_r - m),  entropy = log S - W / S
    Q = sum_r P_r**2 exp(log_sum_sq_r),  log sum p**2 = log Q - 2 log S
    mean logit = sum_r mean_r * width_r / V

and the first argmax lies in the lowest shard whose m_r equals m: the label is the
top-1 iff its shard's local top-1 hit and no shard before it ties the max.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .backends import backend_kernels
from .function import row_coefficients
from .layout import accumulate_dtype, rows_to_labels
from .linear_function import HeadTransform, counted_row_indices, gather_rows, head_logits
from .vocab_shard import Agreement, VocabShard, local_targets


def _local_statistics(
    kernels: Any, logits3d: torch.Tensor, targets: torch.Tensor, acc: torch.dtype, stats: bool
) -> list[torch.Tensor]:
    """(row_max, log_sum, [entropy, mean, top1, log_sum_sq]) of this shard's rows; an
    empty shard holds no mass: log_sum = -inf, and its statistics are never read."""
    n_rows = targets.numel()
    if logits3d.shape[-1] == 0:
        zeros = torch.zeros(n_rows, dtype=acc, device=targets.device)
        parts = [zeros, torch.full_like(zeros, float("-inf"))]
        if stats:
            parts += [zeros, zeros, torch.zeros_like(zeros, dtype=torch.bool), zeros]
        return parts
    _, row_max, log_sum, *row_stats = kernels.row_logprob_forward(
        logits3d, targets, acc, stats=stats
    )
    return [row_max, log_sum, *row_stats]


def _label_logits(logits3d: torch.Tensor, targets: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """[N] logit of each row's label where this shard holds it, else 0 (``targets`` local)."""
    inside = (targets >= 0) & (targets < logits3d.shape[-1])
    rows = torch.nonzero(inside).flatten()
    seq_len = logits3d.shape[1]
    values = torch.zeros(targets.shape, dtype=acc, device=targets.device)
    values[rows] = logits3d[rows // seq_len, rows % seq_len, targets[rows]].to(acc)
    return values


def combine(
    parts: list[torch.Tensor],
    label_logit: torch.Tensor,
    targets: torch.Tensor,
    shard: VocabShard,
    agreement: Agreement,
) -> tuple[torch.Tensor, ...]:
    """The global (logprob, pivot m, log S, [entropy, mean, top1, log_sum_sq]) [N] of
    each row from this rank's parts, by two all-reduces over ``shard.group``."""
    row_max, log_sum, *local_stats = parts
    counted = targets >= 0
    # an empty local row (no columns, or all -inf) must not raise the max
    true_max = torch.where(log_sum == float("-inf"), float("-inf"), row_max)
    global_max = true_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=shard.group)
    # while every logit is -inf, pivot on 0 (as kernels/forward.py does)
    pivot = torch.where(global_max == float("-inf"), 0.0, global_max)
    mass = torch.exp(log_sum + (row_max - pivot))  # P_r = S_r exp(m_r - m)
    sums = [mass, label_logit]
    if local_stats:
        entropy, mean, top1, log_sum_sq = local_stats
        # == 0 rather than > 0: a nan mass must reach the sums
        weighted = mass * ((log_sum - entropy) + (row_max - pivot))
        sums.append(torch.where(mass == 0, 0.0, weighted))
        sums.append(torch.where(mass == 0, 0.0, mass * mass * log_sum_sq.exp()))
        sums.append(mean * shard.width)
        holds_max = (true_max == global_max) & (shard.width > 0)
        sums.append((top1 & holds_max).to(mass.dtype))
        label_order = torch.searchsorted(
            torch.tensor(agreement.shard_starts, device=targets.device),
            targets.clamp(min=0),
            right=True,
        )
        sums.append((holds_max & (agreement.order < label_order - 1)).to(mass.dtype))
    reduced = torch.stack(sums)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=shard.group)
    total_log = reduced[0].log()
    logprob = torch.where(counted, (reduced[1] - pivot) - total_log, 0.0)
    total_log = torch.where(counted, total_log, 0.0)
    pivot = torch.where(counted, pivot, 0.0)
    if not local_stats:
        return logprob, pivot, total_log
    total = reduced[0]
    entropy = total_log - reduced[2] / total
    sum_sq = reduced[3].log() - 2.0 * total_log
    mean = reduced[4] / agreement.vocab
    # a nan logit anywhere has no order: no top-1 (MAX may have passed over the nan)
    top1 = (reduced[5] > 0) & (reduced[6] == 0) & ~total.isnan()
    stats = [torch.where(counted, value, 0.0) for value in (entropy, mean, sum_sq)]
    return logprob, pivot, total_log, stats[0], stats[1], top1 & counted, stats[2]


def _sequence_outputs(
    ctx: Any,
    kernels: Any,
    parts: list[torch.Tensor],
    label_logit: torch.Tensor,
    targets: torch.Tensor,
    cu_seqlens: torch.Tensor,
    shift: int,
    shard: VocabShard,
    agreement: Agreement,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Both Functions' outputs from this rank's parts: ((sum, mean, count, token_logprobs,
    *statistics at label positions), the rows' pivot m, their log S), the ones without
    gradient marked on ``ctx``."""
    logprob, pivot, log_sum, *row_stats = combine(parts, label_logit, targets, shard, agreement)
    seq_sum, seq_count, seq_mean = kernels.segment_reduce(logprob, targets, cu_seqlens)
    token_stats = [rows_to_labels(values, shift) for values in row_stats]
    ctx.mark_non_differentiable(seq_count, *token_stats)
    outputs = (seq_sum, seq_mean, seq_count, rows_to_labels(logprob, shift), *token_stats)
    return outputs, pivot, log_sum


class ShardedSequenceLogProbs(torch.autograd.Function):
    """``sequence_logprobs`` over this rank's [B, T, V_shard] logits (module docstring)."""

    @staticmethod
    def forward(
        ctx,
        logits3d: torch.Tensor,
        targets: torch.Tensor,
        cu_seqlens: torch.Tensor,
        shift: int,
        inplace_backward: bool,
        stats: bool,
        backend: str,
        shard: VocabShard,
        agreement: Agreement,
    ) -> tuple[torch.Tensor, ...]:
        kernels = backend_kernels(backend)
        acc = accumulate_dtype(logits3d.dtype)
        local = local_targets(targets, shard)
        parts = _local_statistics(kernels, logits3d, local, acc, stats)
        label_logit = _label_logits(logits3d, local, acc)
        outputs, pivot, log_sum = _sequence_outputs(
            ctx, kernels, parts, label_logit, targets, cu_seqlens, shift, shard, agreement
        )
        ctx.save_for_backward(logits3d, local, targets, cu_seqlens, pivot, log_sum, outputs[2])
        ctx.settings = (shift, inplace_backward, backend)
        return outputs

    @staticmethod
    def backward(ctx, grad_sum, grad_mean, _grad_count, grad_token, *_not_differentiable):
        logits3d, local, targets, cu_seqlens, pivot, log_sum, seq_count = ctx.saved_tensors
        shift, inplace_backward, backend = ctx.settings
        coef = row_coefficients(
            targets, cu_seqlens, seq_count, grad_sum, grad_mean, grad_token, shift, log_sum.dtype
        )
        if logits3d.shape[-1] == 0:
            grad = torch.zeros_like(logits3d)
        elif inplace_backward:
            torch.ops.lenalign.row_logprob_backward_(logits3d, local, pivot, log_sum, coef, backend)
            grad = logits3d
        else:
            grad = torch.ops.lenalign.row_logprob_backward(
                logits3d, local, pivot, log_sum, coef, backend
            )
        return grad, *(None,) * 8


class ShardedLinearSequenceLogProbs(torch.autograd.Function):
    """``linear_sequence_logprobs`` with this rank's rows ``start:stop`` of the head."""

    @staticmethod
    def forward(
        ctx,
        hidden3d: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        cu_seqlens: torch.Tensor,
        shift: int,
        chunk_rows: int,
        transform: HeadTransform,
        stats: bool,
        backend: str,
        shard: VocabShard,
        agreement: Agreement,
    ) -> tuple[torch.Tensor, ...]:
        kernels = backend_kernels(backend)
        acc = accumulate_dtype(hidden3d.dtype)
        local = local_targets(targets, shard)
        counted_rows = counted_row_indices(targets)
        hidden_counted = gather_rows(hidden3d, counted_rows)
        n_rows = targets.numel()
        parts = None
        label_logit = torch.zeros(n_rows, dtype=acc, device=hidden3d.device)
        for start in range(0, counted_rows.numel(), chunk_rows):
            rows = counted_rows[start : start + chunk_rows]
            logits, _ = transform.forward(
                head_logits(hidden_counted[start : start + chunk_rows], weight, bias)
            )
            chunk = _local_statistics(kernels, logits.unsqueeze(0), local[rows], acc, stats)
            if parts is None:  # uncounted rows: as the kernels leave them
                parts = [torch.zeros(n_rows, dtype=p.dtype, device=p.device) for p in chunk]
            for values, chunk_values in zip(parts, chunk, strict=True):
                values[rows] = chunk_values
            label_logit[rows] = _label_logits(logits.unsqueeze(0), local[rows], acc)
            del logits, chunk  # one chunk of logits lives at a time
        if parts is None:  # no counted row
            empty = hidden3d.new_empty((*hidden3d.shape[:2], 0))
            parts = _local_statistics(kernels, empty, local, acc, stats)
        outputs, pivot, log_sum = _sequence_outputs(
            ctx, kernels, parts, label_logit, targets, cu_seqlens, shift, shard, agreement
        )
        seq_count = outputs[2]
        ctx.save_for_backward(
            hidden_counted, weight, bias, local, targets, cu_seqlens, pivot, log_sum, seq_count
        )
        ctx.settings = (shift, chunk_rows, transform, backend, shard, list(hidden3d.shape))
        return outputs

    @staticmethod
    def backward(ctx, grad_sum, grad_mean, _grad_count, grad_token, *_not_differentiable):
        saved = ctx.saved_tensors
        hidden_counted, weight, bias, local, targets, cu_seqlens, pivot, log_sum, count = saved
        shift, chunk_rows, transform, backend, shard, hidden_shape = ctx.settings
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        needs[2] = needs[2] and bias is not None
        coef = row_coefficients(
            targets, cu_seqlens, count, grad_sum, grad_mean, grad_token, shift, log_sum.dtype
        )
        if weight.shape[0] == 0:  # an empty shard: no logits, no gradient of its own
            grad_hidden = hidden_counted.new_zeros(hidden_shape)
            grad_weight, grad_bias = torch.zeros_like(weight), None
            if bias is not None:
                grad_bias = torch.zeros_like(bias)
        else:
            grad_hidden, grad_weight, grad_bias = (
                torch.ops.lenalign.linear_sequence_logprobs_backward(
                    hidden_counted,
                    weight,
                    bias,
                    local,
                    pivot,
                    log_sum,
                    coef,
                    chunk_rows,
                    transform.scale,
                    transform.softcap,
                    True,
                    hidden_shape,
                    needs,
                    backend,
                )
            )
        if needs[0] and shard.reduce_hidden_grad:
            # only the counted rows carry gradient: all-reduce those [M, H], not [B, T, H]
            flat = grad_hidden.view(-1, hidden_shape[-1])
            counted_rows = counted_row_indices(targets)
            part = flat[counted_rows]
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=shard.group)
            flat[counted_rows] = part
        grads = (grad_hidden, grad_weight, grad_bias)
        return *(g if need else None for g, need in zip(grads, needs, strict=True)), *(None,) * 9
