"""The operator behind ``linear_sequence_logprobs``: LM head and log-likelihoods in
chunks of counted rows, so that the [N, V] logits never exist at once.

Forward, for each chunk of m counted rows with hidden states h [m, H]:

    z = h W^T + b                      [m, V] in the hidden states' dtype, as the head computes it
    z = transform(z)                   scale and soft cap, where the model has them (HeadTransform)
    logprob, m, log_sum = row kernels  (kernels/forward.py), z then freed

Backward, for each chunk: z is recomputed (the same matmul, so the same bits), the row
backward kernel writes g = dL/dz = c[r] * (1[v == y] - p[v]) over it
(kernels/backward.py), g is taken back through the transform, and with z = h W^T + b

    dL/dh = g W        [m, H]
    dL/dW = sum over chunks of g^T h    [V, H]
    dL/db = sum over rows of g          [V]

Rows that are not counted are never projected; their hidden states get zero gradient.
Over several chunks, dL/dW and dL/db are summed in float32 for 16-bit weights: rounding
each chunk's product to 16 bits first would make the error grow with the chunk count.

Registered as ``torch.ops.lenalign.linear_sequence_logprobs`` with its backward, like the
logits' operator (function.py). What the backward keeps: eagerly, the counted rows'
hidden states only ([M, H], gathered by the forward: the caller's [B, T, H] tensor is
not held); under torch.compile, whose graphs need shapes known before the data, the
[B, T, H] hidden states themselves, through save_for_backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .backends import backend_kernels
from .function import (
    STATS_DTYPES,
    row_coefficients,
    sequence_fake_outputs,
    token_stats_outputs,
)
from .layout import accumulate_dtype, rows_to_labels

# logits of one chunk: 256 MiB, e.g. 1046 rows of a 128256-token vocabulary in bf16
CHUNK_LOGIT_BYTES = 256 * 1024 * 1024
# torch.addmm(total, a, b, out_dtype=float32) with 16-bit CUDA matrices forms the products
# in fp32 without upcast copies (torch >= 2.8). Torch 2.8 and 2.9 refuse an fp32 ``total``
# there (pytorch#154086, lifted by pytorch#167931): the first refusal switches this process
# to the upcasting path for good.
_mixed_addmm = {"usable": tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 8)}


def default_chunk_rows(vocab: int, element_size: int) -> int:
    """Rows per chunk such that one chunk's logits take at most CHUNK_LOGIT_BYTES."""
    return max(1, CHUNK_LOGIT_BYTES // (vocab * element_size))


def head_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Logits h W^T + b in the inputs' dtype. Autocast is off: the backward recomputes
    these logits, and must get the same bits as the forward whatever context it runs in."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden, weight, bias)


@dataclass(frozen=True)
class HeadTransform:
    """What some models do to h W^T + b before the softmax, written as they write it, in
    the logits' dtype: ``z * scale`` (Cohere's logit_scale), then
    ``softcap * tanh(z / softcap)`` (Gemma 2's final_logit_softcapping)."""

    scale: float = 1.0
    softcap: float | None = None

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(transformed logits, the tanh output the backward needs, or None)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is None:
            return logits, None
        capped = torch.tanh(logits / self.softcap)
        return capped * self.softcap, capped

    def backward(self, grad: torch.Tensor, capped: torch.Tensor | None) -> torch.Tensor:
        """dL/dz from dL/d(transformed z): the chain of the forward's ops, op by op, as
        eager autograd takes it (d tanh(u) / du = 1 - tanh(u)**2 via aten's tanh_backward)."""
        if self.softcap is not None:
            grad = torch.ops.aten.tanh_backward(grad * self.softcap, capped) / self.softcap
        if self.scale != 1.0:
            grad = grad * self.scale
        return grad


def _add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b, the product formed in total's precision, never rounded to 16 bits."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
        return
    if total.is_cuda and _mixed_addmm["usable"]:
        try:
            torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
            return
        except RuntimeError as error:
            if "dtype" not in str(error):
                raise
            _mixed_addmm["usable"] = False
    # no mixed-precision matmul (CPU, older torch): upcast copies of the chunk's operands
    total.addmm_(a.to(total.dtype), b.to(total.dtype))


def counted_row_indices(targets: torch.Tensor) -> torch.Tensor:
    """[M] flat indices of the counted rows, in order."""
    return torch.nonzero(targets >= 0).flatten()


def gather_rows(hidden3d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[M, H] hidden states of flat rows ``rows`` of a [B, T, H] tensor (a copy)."""
    seq_len = hidden3d.shape[1]
    return hidden3d[rows // seq_len, rows % seq_len]


@torch.library.custom_op("lenalign::linear_sequence_logprobs", mutates_args=())
def linear_sequence_logprobs_op(
    hidden3d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    cu_seqlens: torch.Tensor,
    shift: int,
    chunk_rows: int,
    scale: float,
    softcap: float | None,
    compact: bool,
    stats: bool,
    backend: str,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """(sum [S], mean [S], count [S], token_logprobs [N], row_max [N], log_sum [N],
    entropy, mean_logits, is_top1, log_sum_sq_probs, hidden_counted): the statistics
    [N] with ``stats``, else empty; the last the counted rows' hidden states [M, H] when
    ``compact``, else an empty [0, H] (the backward then reads ``hidden3d``)."""
    kernels = backend_kernels(backend)
    transform = HeadTransform(scale, softcap)
    acc = accumulate_dtype(hidden3d.dtype)
    n_rows = targets.numel()
    counted_rows = counted_row_indices(targets)
    # the counted rows' hidden states, gathered once: [M, H], small beside the logits
    hidden_counted = gather_rows(hidden3d, counted_rows)
    targets_counted = targets[counted_rows]
    row_max = torch.zeros(n_rows, dtype=acc, device=hidden3d.device)
    log_sum = torch.zeros_like(row_max)
    row_logprob = torch.zeros_like(row_max)
    row_stats = None
    if stats:
        row_stats = [
            torch.zeros(n_rows, dtype=d or acc, device=row_max.device) for d in STATS_DTYPES
        ]
    for start in range(0, counted_rows.numel(), chunk_rows):
        rows = counted_rows[start : start + chunk_rows]
        logits, _ = transform.forward(
            head_logits(hidden_counted[start : start + chunk_rows], weight, bias)
        )
        chunk = kernels.row_logprob_forward(
            logits.unsqueeze(0), targets_counted[start : start + chunk_rows], acc, stats=stats
        )
        row_logprob[rows], row_max[rows], log_sum[rows] = chunk[:3]
        for values, chunk_values in zip(row_stats or (), chunk[3:], strict=True):
            values[rows] = chunk_values
        del logits, chunk  # before the next chunk's: one chunk of logits lives at a time
    seq_sum, seq_count, seq_mean = kernels.segment_reduce(row_logprob, targets, cu_seqlens)
    if not compact:
        hidden_counted = hidden3d.new_empty((0, hidden3d.shape[-1]))
    token_logprobs = rows_to_labels(row_logprob, shift)
    token_stats = token_stats_outputs(row_stats, hidden3d, acc, shift)
    outputs = (seq_sum, seq_mean, seq_count, token_logprobs, row_max, log_sum)
    return *outputs, *token_stats, hidden_counted


@linear_sequence_logprobs_op.register_fake
def _(hidden3d, weight, bias, targets, cu_seqlens, shift, chunk_rows, scale, softcap, *flags):
    compact, stats, _backend = flags
    acc = accumulate_dtype(hidden3d.dtype)
    outputs = sequence_fake_outputs(hidden3d, targets.shape[0], cu_seqlens, acc, stats)
    # compact output's row count depends on the data; the wrappers ask for it eagerly only
    counted = torch.library.get_ctx().new_dynamic_size() if compact else 0
    return (*outputs, hidden3d.new_empty((counted, hidden3d.shape[-1])))


@torch.library.custom_op("lenalign::linear_sequence_logprobs_backward", mutates_args=())
def linear_sequence_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    coef: torch.Tensor,
    chunk_rows: int,
    scale: float,
    softcap: float | None,
    compact: bool,
    hidden_shape: list[int],
    needs_grad: list[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dhidden ``hidden_shape``, dL/dW [V, H], dL/db [V]); an empty tensor in place
    of each gradient that ``needs_grad`` (hidden, weight, bias) does not ask for.

    ``hidden`` is the counted rows' [M, H] when ``compact``, else the [B, T, H] tensor.
    """
    kernels = backend_kernels(backend)
    transform = HeadTransform(scale, softcap)
    need_hidden, need_weight, need_bias = needs_grad
    counted_rows = counted_row_indices(targets)
    hidden_counted = hidden if compact else gather_rows(hidden, counted_rows)
    coef_counted = coef[counted_rows]
    targets_counted = targets[counted_rows]
    row_max, log_sum = row_max[counted_rows], log_sum[counted_rows]
    chunks = range(0, counted_rows.numel(), chunk_rows)
    # one chunk: the products in one matmul, rounded once, as eager autograd does
    sum_dtype = weight.dtype if len(chunks) <= 1 else accumulate_dtype(weight.dtype)
    grad_hidden_counted = torch.empty_like(hidden_counted) if need_hidden else None
    grad_weight = weight.new_empty(0)
    grad_bias = weight.new_empty(0)
    if need_weight:
        grad_weight = torch.zeros(weight.shape, dtype=sum_dtype, device=weight.device)
    if need_bias:
        grad_bias = torch.zeros(weight.shape[0], dtype=sum_dtype, device=weight.device)
    # the gradient's matmuls in the inputs' dtype too, as the head's logits are
    no_autocast = torch.autocast(device_type=weight.device.type, enabled=False)
    for start in chunks:
        rows = slice(start, start + chunk_rows)
        logits, capped = transform.forward(head_logits(hidden_counted[rows], weight, bias))
        kernels.row_logprob_backward(
            logits.unsqueeze(0),
            targets_counted[rows],
            row_max[rows],
            log_sum[rows],
            coef_counted[rows],
            logits.unsqueeze(0),
        )
        # the row backward wrote dL/d(transformed logits) over them; back through the
        # transform to dL/d(h W^T + b)
        grad_logits = transform.backward(logits, capped)
        with no_autocast:
            if need_hidden:
                grad_hidden_counted[rows] = grad_logits @ weight
            if need_weight:
                _add_product(grad_weight, grad_logits.t(), hidden_counted[rows])
            if need_bias:
                grad_bias += grad_logits.sum(0, dtype=sum_dtype)
        del logits, capped, grad_logits  # one chunk at a time, as in the forward
    grad_hidden = hidden.new_empty(0)
    if need_hidden:
        seq_len = hidden_shape[1]
        grad_hidden = hidden.new_zeros(hidden_shape)
        grad_hidden[counted_rows // seq_len, counted_rows % seq_len] = grad_hidden_counted
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@linear_sequence_logprobs_backward.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    row_max,
    log_sum,
    coef,
    chunk_rows,
    scale,
    softcap,
    compact,
    hidden_shape,
    needs_grad,
    backend,
):
    need_hidden, need_weight, need_bias = needs_grad
    return (
        hidden.new_empty(hidden_shape if need_hidden else 0),
        weight.new_empty(weight.shape if need_weight else 0),
        weight.new_empty(weight.shape[0] if need_bias else 0),
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden3d, weight, bias, targets, cu_seqlens, shift, chunk_rows, scale, softcap = inputs[:9]
    compact, _stats, backend = inputs[9:]
    _, _, seq_count, _, row_max, log_sum, *token_stats, hidden_counted = output
    # through save_for_backward only, so that saved_tensors_hooks see every tensor
    hidden = hidden_counted if compact else hidden3d
    ctx.save_for_backward(hidden, weight, bias, targets, cu_seqlens, row_max, log_sum, seq_count)
    ctx.mark_non_differentiable(seq_count, row_max, log_sum, *token_stats, hidden_counted)
    ctx.hidden_shape = list(hidden3d.shape)
    ctx.settings = (shift, chunk_rows, scale, softcap, compact, backend)


def _backward(ctx, grad_sum, grad_mean, _grad_count, grad_token, *_grad_saved):
    needs_grad = list(ctx.needs_input_grad[:3])
    if not any(needs_grad):
        return (None,) * 12
    hidden, weight, bias, targets, cu_seqlens, row_max, log_sum, seq_count = ctx.saved_tensors
    shift, chunk_rows, scale, softcap, compact, backend = ctx.settings
    needs_grad[2] = needs_grad[2] and bias is not None
    coef = row_coefficients(
        targets, cu_seqlens, seq_count, grad_sum, grad_mean, grad_token, shift, log_sum.dtype
    )
    grads = torch.ops.lenalign.linear_sequence_logprobs_backward(
        hidden,
        weight,
        bias,
        targets,
        row_max,
        log_sum,
        coef,
        chunk_rows,
        scale,
        softcap,
        compact,
        ctx.hidden_shape,
        needs_grad,
        backend,
    )
    grad_hidden, grad_weight, grad_bias = (
        grad if need else None for grad, need in zip(grads, needs_grad, strict=True)
    )
    return (grad_hidden, grad_weight, grad_bias, *(None,) * 9)


linear_sequence_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


class LinearSequenceLogProbsUnderFunc(torch.autograd.Function):
    """The same operator as an autograd.Function with ``setup_context``, for torch.func
    transforms (see SequenceLogProbsUnderFunc in function.py)."""

    @staticmethod
    def forward(*inputs):
        return torch.ops.lenalign.linear_sequence_logprobs(*inputs)

    setup_context = staticmethod(_setup_context)
    # the backward operators have no autograd of their own, which torch.func would call
    backward = staticmethod(once_differentiable(_backward))
