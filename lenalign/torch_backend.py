"""Pure-PyTorch backend: the kernels' semantics for CPU and any device Triton does not run on.

Same contract as ``lenalign.kernels`` (same arguments, same outputs, same hand-written
backward). It walks runs of consecutive counted rows as strided views of the logits (no
gather copies, uncounted rows never read); its eager ops take a chunk of at most
``CHUNK_ELEMENTS`` logits at a time: a bound on the fp32 working memory besides the
gradient it returns.

The forward's per-row statistics (max, then log of the sum of exponentials) are, on CPU
and for calls of at least ``COMPILE_MIN_LOGITS`` counted logits, one kernel that
``torch.compile`` fuses: each row is read from memory once and its second pass comes
from the cache, where the eager ops make five passes over a chunk-sized buffer. Where
compiling fails (no C++ compiler, say), the eager ops serve, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch

# 4 Mi elements, a 16 MiB fp32 chunk. Smaller chunks fit a core's L2 but multiply the
# parallel regions (about four per chunk and direction); on a 2-core machine where another
# process holds a core, each region can stall for a scheduler slice: measured at
# 4 x 512 x 128256, forward + backward took 7.6 to 22 s with 1 MiB chunks, 2.5 s with 16 MiB.
CHUNK_ELEMENTS = 1 << 22
# 16 Mi counted logits, about 50 ms of eager forward on one core: below it the one-off
# compilation (seconds, cached on disk across processes) would not pay for itself
COMPILE_MIN_LOGITS = 1 << 24


def _row_runs(
    counted: torch.Tensor, seq_len: int, vocab: int, chunked: bool = True
) -> Iterator[tuple[bool, int, int, int, slice]]:
    """Yield (counted, batch, first position, last position + 1, flat rows) over all N rows.

    ``counted`` [N] is the bool mask of counted rows, on the host. Runs are maximal
    stretches of rows of one batch entry that are all counted or all not, cut into chunks
    of at most CHUNK_ELEMENTS logits when ``chunked``.
    """
    n_rows = counted.numel()
    if n_rows == 0:
        return
    boundary = torch.ones(n_rows, dtype=torch.bool)
    boundary[1:] = counted[1:] != counted[:-1]
    boundary[::seq_len] = True  # a run never crosses into the next batch entry
    starts = torch.nonzero(boundary).flatten().tolist()
    chunk_rows = max(1, CHUNK_ELEMENTS // max(vocab, 1)) if chunked else seq_len
    for start, end in zip(starts, [*starts[1:], n_rows], strict=True):
        batch, first_position = divmod(start, seq_len)
        for chunk_start in range(first_position, first_position + end - start, chunk_rows):
            chunk_end = min(chunk_start + chunk_rows, first_position + end - start)
            rows = slice(batch * seq_len + chunk_start, batch * seq_len + chunk_end)
            yield bool(counted[start]), batch, chunk_start, chunk_end, rows


def row_statistics(
    z: torch.Tensor, acc: torch.dtype, stats: bool = False
) -> tuple[torch.Tensor, ...]:
    """(m [r], log_sum [r]) of the rows of ``z`` [r, V], in dtype ``acc``; with ``stats``
    also (entropy, mean_logits, first argmax (int64), log_sum_sq_probs), as in
    kernels/forward.py.

    The logsumexp is kept as its two parts m and log_sum, as in kernels/forward.py, for
    precision.
    """
    z = z.to(acc)
    row_max = z.amax(dim=-1)
    # an all -inf row shifts by 0, so that -inf - -inf never makes a nan
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    shifted = z - row_max[:, None]
    exps = shifted.exp()
    total = exps.sum(dim=-1)
    log_sum = total.log()
    if not stats:
        return row_max, log_sum
    # -sum p log p = log S - sum e (z - m) / S; e == 0 where z == -inf, whose term is 0
    weighted = (exps * torch.where(exps > 0, shifted, 0.0)).sum(dim=-1)
    entropy = log_sum - weighted / total
    log_sum_sq = (exps * exps).sum(dim=-1).log() - 2.0 * log_sum
    return row_max, log_sum, entropy, z.mean(dim=-1), z.argmax(dim=-1), log_sum_sq


# "fn": row_statistics compiled (Dynamo guards on acc and stats, so one wrapper serves
# all); None once compiling failed, for the rest of the process
_compiled: dict[str, Callable | None] = {}


def _statistics(
    z: torch.Tensor, acc: torch.dtype, stats: bool, compiled_call: bool
) -> tuple[torch.Tensor, ...]:
    """``row_statistics`` of a run of rows ``z``; compiled (the whole run at once) when
    ``compiled_call`` and compiling works, else by the eager ops a chunk at a time."""
    if compiled_call and "fn" not in _compiled:
        _compiled["fn"] = torch.compile(row_statistics, dynamic=True)
    compiled = _compiled.get("fn") if compiled_call else None
    if compiled is None:
        return _eager_statistics(z, acc, stats)
    try:
        # detached: the statistics carry no gradient, and a tensor that requires grad
        # would make dynamo compile a second variant of the same kernel
        return compiled(z.detach(), acc, stats)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as error:  # any compiler failure: compilation is an optimization
        _compiled["fn"] = None
        warnings.warn(
            f"lenalign's torch backend runs its forward eagerly: torch.compile failed ({error})",
            RuntimeWarning,
            stacklevel=2,
        )
        return _eager_statistics(z, acc, stats)


def _eager_statistics(z: torch.Tensor, acc: torch.dtype, stats: bool) -> tuple[torch.Tensor, ...]:
    """``row_statistics`` of a run ``z`` by the eager ops, CHUNK_ELEMENTS logits at a
    time: they hold [rows, V] buffers, a bound on the fp32 working memory."""
    rows = max(1, CHUNK_ELEMENTS // max(z.shape[1], 1))
    parts = [
        row_statistics(z[start : start + rows], acc, stats) for start in range(0, len(z), rows)
    ]
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(values) for values in zip(*parts, strict=True))


def row_logprob_forward(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    acc: torch.dtype,
    *,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Return (logprob [N], row_max [N], log_sum [N]) of dtype ``acc``, and with ``stats``
    (entropy, mean_logits, is_top1 (bool), log_sum_sq_probs) [N]; 0 on rows not counted."""
    batch_size, seq_len, vocab = logits3d.shape
    n_rows = batch_size * seq_len
    device = logits3d.device
    dtypes = [acc] * 3 + ([acc, acc, torch.bool, acc] if stats else [])
    outputs = [torch.zeros(n_rows, dtype=dtype, device=device) for dtype in dtypes]
    counted_rows = (targets >= 0).cpu()
    # compiling pays on CPU calls of at least COMPILE_MIN_LOGITS counted logits
    compiled_call = device.type == "cpu" and int(counted_rows.sum()) * vocab >= COMPILE_MIN_LOGITS
    # Whole runs: the compiled kernel holds no [rows, V] buffer, so it takes a run in one
    # parallel region instead of one per 16 MiB chunk (a region ends when its slowest
    # thread does; with another process on one of two cores, each of the 64 regions of a
    # 4 x 512 x 128256 call waited for a scheduler slice: 1.4 to 5.3 s against 0.18 s).
    # The eager ops take each run a chunk at a time (_eager_statistics).
    runs = _row_runs(counted_rows, seq_len, vocab, chunked=False)
    for counted, batch, first, last, rows in runs:
        if not counted:
            continue
        z = logits3d[batch, first:last]
        chunk = _statistics(z, acc, stats, compiled_call)
        chunk_targets = targets[rows]
        # a label held by another rank's vocab shard (vocab_shard.OUTSIDE_SHARD) has no
        # logit here: it contributes 0, and the rank holding it supplies the logit
        inside = chunk_targets < vocab
        label = torch.where(inside, chunk_targets, 0)[:, None]
        target = torch.where(inside, z.gather(1, label).squeeze(1).to(acc), 0.0)
        outputs[0][rows] = (target - chunk[0]) - chunk[1]
        outputs[1][rows], outputs[2][rows] = chunk[0], chunk[1]
        if stats:
            outputs[3][rows], outputs[4][rows] = chunk[2], chunk[3]
            outputs[5][rows] = chunk[4] == chunk_targets
            outputs[6][rows] = chunk[5]
    return tuple(outputs)


def row_logprob_backward(
    logits3d: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    coef: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """Write dL/dz = c[r] * (1[v == y] - softmax(z)[v]) into ``grad`` (may be ``logits3d``).

    See kernels/backward.py for the derivation. The work happens in ``log_sum.dtype``; the
    label element is formed as c * (1 - p[y]), exact in that dtype for p[y] >= 1/2, before
    the one rounding to the gradient's dtype.
    """
    acc = log_sum.dtype
    seq_len, vocab = logits3d.shape[1], logits3d.shape[2]
    for counted, batch, first, last, rows in _row_runs((targets >= 0).cpu(), seq_len, vocab):
        out = grad[batch, first:last]
        if not counted:
            out.zero_()
            continue
        z = logits3d[batch, first:last]
        # fp32/fp64 gradients are computed in their own storage; 16-bit ones in a chunk
        # buffer, rounded once by the final copy
        work = out if grad.dtype == acc else torch.empty(out.shape, dtype=acc, device=out.device)
        torch.sub(z, row_max[rows, None], out=work)
        prob = work.sub_(log_sum[rows, None]).exp_()
        chunk_targets = targets[rows, None]
        inside = chunk_targets < vocab  # else the label is in another vocab shard
        label = torch.where(inside, chunk_targets, 0)
        chunk_coef = coef[rows, None]
        label_prob = prob.gather(1, label)
        # outside the shard, column 0 is written back as the -c * p it is anyway
        label_grad = torch.where(inside, chunk_coef * (1.0 - label_prob), -chunk_coef * label_prob)
        prob.mul_(-chunk_coef).scatter_(1, label, label_grad)
        if work is not out:
            out.copy_(work)
    return grad


def segment_reduce(
    logprob: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (sum [S], count [S] int64, mean [S]) of ``logprob`` per sequence.

    A prefix sum would lose precision and index_add_ uses atomics on GPUs; segment_reduce
    adds each segment's values in a fixed order, so results are reproducible bit for bit.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if logprob.numel() == 0:  # segment_reduce rejects empty data
        seq_sum = logprob.new_zeros(lengths.shape)
    else:
        seq_sum = torch.segment_reduce(logprob, "sum", lengths=lengths, initial=0)
    # integer prefix sums are exact, so counts may use them
    counted_before = torch.nn.functional.pad((targets >= 0).cumsum(0), (1, 0))
    seq_count = counted_before[cu_seqlens[1:]] - counted_before[cu_seqlens[:-1]]
    seq_mean = torch.where(seq_count > 0, seq_sum / seq_count.clamp(min=1), 0.0)
    return seq_sum, seq_count, seq_mean
