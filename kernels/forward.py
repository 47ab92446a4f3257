"""Forward: per-row logsumexp and label log-probability, one streaming pass over the row.

For row r with logits z and target y the kernel computes

    m[r] = max_v z[v],  log_sum[r] = log sum_v exp(z[v] - m[r])   (online, one pass)
    logprob[r] = (z[y] - m[r]) - log_sum[r]

reading z once, in blocks of BLOCK_V, accumulating in fp32 (fp64 for fp64 logits).
The logsumexp m + log_sum is saved as its two parts: folded into one fp32 number it
would carry an absolute error of ulp(|m|) / 2, which for logits of magnitude 1e4 is 5e-4
in every log-probability and, in the backward, in every exp(z - lse); kept apart, z - m
is exact near the maximum, where the probabilities that matter live.
Rows whose target is -1 (not counted: prompt, padding, ignore_index, the last row of a
shifted segment) are not read at all; they store logprob 0.

With STATS, the same pass also yields the per-token figures trainers log (TRL's entropy,
mean logits, top-1 accuracy, log of the summed squared probabilities), from two more
running sums kept relative to the running max m and rescaled with it as S is (W, Q),
a plain sum Z and the first argmax:

    S = sum_v e[v],  e[v] = exp(z[v] - m)       W = sum_v e[v] (z[v] - m)
    Q = sum_v e[v]**2                            Z = sum_v z[v]
    entropy = -sum_v p log p = log S - W / S     (p log p = p ((z - m) - log S))
    log sum_v p**2 = log Q - 2 log S,  mean logits = Z / V,  top1 = (first argmax == y)

When m grows to m', e scales by c = exp(m - m'), so S -> c S, Q -> c**2 Q, and
W -> c (W + (m - m') S), since z - m' = (z - m) + (m - m'). No gradient flows through
them: they are logged, not trained on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import triton_dtype, vocab_block


@triton.jit
def _row_logprob_forward_kernel(
    logits_ptr,  # [B, T, V] logits, any row strides, vocab stride 1
    targets_ptr,  # [N] int64 target of each row, -1 = not counted
    logprob_ptr,  # [N] out: log p(target), 0 where not counted
    row_max_ptr,  # [N] out: m[r], saved for the backward
    log_sum_ptr,  # [N] out: log_sum[r], saved for the backward
    entropy_ptr,  # [N] out with STATS: -sum p log p
    mean_ptr,  # [N] out with STATS: mean logit
    top1_ptr,  # [N] out with STATS: bool, the target is the (first) argmax
    sum_sq_ptr,  # [N] out with STATS: log sum p**2
    seq_len,  # T: rows are addressed as (r // T, r % T)
    stride_batch,
    stride_position,
    vocab,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    STATS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride can pass 2**31
    target = tl.load(targets_ptr + row)
    if target >= 0:
        row_ptr = logits_ptr + (row // seq_len) * stride_batch + (row % seq_len) * stride_position
        running_max = tl.full((), float("-inf"), ACC_DTYPE)
        running_sum = tl.zeros((), ACC_DTYPE)
        # the label's logit is caught on the way, lane-wise, and reduced once at the end
        target_hits = tl.zeros((BLOCK_V,), ACC_DTYPE)
        running_w = tl.zeros((), ACC_DTYPE)
        running_q = tl.zeros((), ACC_DTYPE)
        running_z = tl.zeros((), ACC_DTYPE)
        first_argmax = tl.zeros((), tl.int64)
        previous_pivot = tl.zeros((), ACC_DTYPE)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < vocab
            z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
            block_max = tl.max(z, axis=0)
            new_max = tl.maximum(running_max, block_max)
            # while every logit so far is -inf, pivot on 0 so that exp(-inf - -inf) never
            # turns into nan; +inf and nan logits still reach the sum and propagate
            pivot = tl.where(new_max == float("-inf"), 0.0, new_max).to(ACC_DTYPE)
            rescale = tl.exp(running_max - pivot)
            e = tl.exp(z - pivot)
            if STATS:
                # W and Q relative to the previous pivot, moved to the new one (docstring)
                running_w = rescale * (running_w + (previous_pivot - pivot) * running_sum)
                running_w += tl.sum(e * tl.where(e > 0, z - pivot, 0.0), axis=0)
                running_q = running_q * rescale * rescale + tl.sum(e * e, axis=0)
                running_z += tl.sum(tl.where(in_row, z, 0.0), axis=0)
                # strictly greater: a tie keeps the earlier block's index, as argmax does
                block_argmax = start + tl.argmax(z, axis=0)
                first_argmax = tl.where(block_max > running_max, block_argmax, first_argmax)
                previous_pivot = pivot
            running_sum = running_sum * rescale + tl.sum(e, axis=0)
            running_max = new_max
            target_hits += tl.where(cols == target, z, 0.0)
        target_logit = tl.sum(target_hits, axis=0)
        # running_sum is relative to the last pivot: the max, or 0 for an all -inf row
        row_max = tl.where(running_max == float("-inf"), 0.0, running_max).to(ACC_DTYPE)
        log_sum = tl.log(running_sum)
        tl.store(row_max_ptr + row, row_max)
        tl.store(log_sum_ptr + row, log_sum)
        tl.store(logprob_ptr + row, (target_logit - row_max) - log_sum)
        if STATS:
            tl.store(entropy_ptr + row, log_sum - running_w / running_sum)
            tl.store(mean_ptr + row, running_z / vocab)
            tl.store(top1_ptr + row, first_argmax == target)
            tl.store(sum_sq_ptr + row, tl.log(running_q) - 2.0 * log_sum)
    else:
        tl.store(row_max_ptr + row, tl.zeros((), ACC_DTYPE))
        tl.store(log_sum_ptr + row, tl.zeros((), ACC_DTYPE))
        tl.store(logprob_ptr + row, tl.zeros((), ACC_DTYPE))
        if STATS:
            tl.store(entropy_ptr + row, tl.zeros((), ACC_DTYPE))
            tl.store(mean_ptr + row, tl.zeros((), ACC_DTYPE))
            tl.store(top1_ptr + row, False)
            tl.store(sum_sq_ptr + row, tl.zeros((), ACC_DTYPE))


def row_logprob_forward(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    acc: torch.dtype,
    launch: tuple[int, int] | None = None,
    *,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward over all N rows of ``logits3d`` [B, T, V].

    Returns (logprob [N], row_max [N], log_sum [N]), of dtype ``acc`` (float32/float64),
    and with ``stats`` also (entropy, mean_logits, is_top1 (bool), log_sum_sq_probs), [N]
    each, 0 where not counted. ``launch`` = (BLOCK_V, num_warps) overrides the heuristic
    (benchmarks/tune.py sweeps it).
    """
    batch, seq_len, vocab = logits3d.shape
    n_rows = batch * seq_len
    outputs = [torch.empty(n_rows, dtype=acc, device=logits3d.device) for _ in range(3)]
    if stats:
        outputs += [torch.empty(n_rows, dtype=acc, device=logits3d.device) for _ in range(2)]
        outputs.append(torch.empty(n_rows, dtype=torch.bool, device=logits3d.device))
        outputs.append(torch.empty(n_rows, dtype=acc, device=logits3d.device))
    if n_rows == 0:
        return tuple(outputs)
    # without STATS the kernel never touches its four statistics pointers
    stats_out = outputs[3:] if stats else outputs[:1] * 4
    block, warps = launch or vocab_block(vocab, logits3d.element_size())
    _row_logprob_forward_kernel[(n_rows,)](
        logits3d,
        targets,
        *outputs[:3],
        *stats_out,
        seq_len,
        logits3d.stride(0),
        logits3d.stride(1),
        vocab,
        ACC_DTYPE=triton_dtype(acc),
        BLOCK_V=block,
        STATS=stats,
        num_warps=warps,
    )
    return tuple(outputs)
