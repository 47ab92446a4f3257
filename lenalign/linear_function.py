"""The autograd Function behind ``linear_sequence_logprobs``: LM head and log-likelihoods
in chunks of counted rows, so that the [N, V] logits never exist at once.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from .function import accumulate_dtype, row_coefficients, sequence_outputs
from .layout import RowLayout

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


def _head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
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


class LinearSequenceLogProbsFunction(torch.autograd.Function):
    """(sum [S], mean [S], count [S], token_logprobs [N]) of hidden states through a head.

    Differentiable in the hidden states, the weight and the bias, through sum, mean and
    token_logprobs at once (one coefficient per row, as in SequenceLogProbsFunction).
    """

    @staticmethod
    def forward(
        ctx,
        hidden3d: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layout: RowLayout,
        backend: ModuleType,
        chunk_rows: int,
        transform: HeadTransform,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        acc = accumulate_dtype(hidden3d.dtype)
        steps = hidden3d.shape[1]
        n_rows = layout.targets.numel()
        counted_rows = torch.nonzero(layout.targets >= 0).flatten()
        # the counted rows' hidden states, gathered once: [M, H], small beside the logits
        hidden_counted = hidden3d[counted_rows // steps, counted_rows % steps]
        targets_counted = layout.targets[counted_rows]
        row_max = torch.empty(counted_rows.numel(), dtype=acc, device=hidden3d.device)
        log_sum = torch.empty_like(row_max)
        logprob_counted = torch.empty_like(row_max)
        for start in range(0, counted_rows.numel(), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits, _ = transform.forward(_head(hidden_counted[rows], weight, bias))
            logprob_counted[rows], row_max[rows], log_sum[rows] = backend.row_logprob_forward(
                logits.unsqueeze(0), targets_counted[rows], acc
            )
            del logits  # before the next chunk's, so that one chunk of logits lives at a time
        row_logprob = torch.zeros(n_rows, dtype=acc, device=hidden3d.device)
        row_logprob[counted_rows] = logprob_counted
        outputs = sequence_outputs(ctx, layout, backend, row_logprob)
        ctx.save_for_backward(
            hidden_counted, counted_rows, weight, bias, row_max, log_sum, outputs[2]
        )
        ctx.hidden_shape = hidden3d.shape
        ctx.chunk_rows = chunk_rows
        ctx.transform = transform
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sum, grad_mean, _grad_count, grad_token):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not (need_hidden or need_weight or need_bias):
            return None, None, None, None, None, None, None
        hidden_counted, counted_rows, weight, bias, row_max, log_sum, seq_count = ctx.saved_tensors
        layout: RowLayout = ctx.layout
        coef = row_coefficients(layout, seq_count, grad_sum, grad_mean, grad_token, log_sum.dtype)
        coef_counted = coef[counted_rows]
        targets_counted = layout.targets[counted_rows]
        chunk_rows = ctx.chunk_rows
        chunks = range(0, counted_rows.numel(), chunk_rows)
        # one chunk: the products in one matmul, rounded once, as eager autograd does
        sum_dtype = weight.dtype if len(chunks) <= 1 else accumulate_dtype(weight.dtype)
        grad_hidden_counted = torch.empty_like(hidden_counted) if need_hidden else None
        grad_weight = grad_bias = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=sum_dtype, device=weight.device)
        if need_bias:
            grad_bias = torch.zeros(weight.shape[0], dtype=sum_dtype, device=weight.device)
        # the gradient's matmuls in the inputs' dtype too, as the head's logits are
        no_autocast = torch.autocast(device_type=weight.device.type, enabled=False)
        for start in chunks:
            rows = slice(start, start + chunk_rows)
            logits, capped = ctx.transform.forward(_head(hidden_counted[rows], weight, bias))
            ctx.backend.row_logprob_backward(
                logits.unsqueeze(0),
                targets_counted[rows],
                row_max[rows],
                log_sum[rows],
                coef_counted[rows],
                logits.unsqueeze(0),
            )
            # the row backward wrote dL/d(transformed logits) over them; back through the
            # transform to dL/d(h W^T + b)
            grad_logits = ctx.transform.backward(logits, capped)
            with no_autocast:
                if need_hidden:
                    grad_hidden_counted[rows] = grad_logits @ weight
                if need_weight:
                    _add_product(grad_weight, grad_logits.t(), hidden_counted[rows])
                if need_bias:
                    grad_bias += grad_logits.sum(0, dtype=sum_dtype)
            del logits, capped, grad_logits  # one chunk at a time, as in the forward
        grad_hidden = None
        if need_hidden:
            steps = ctx.hidden_shape[1]
            grad_hidden = hidden_counted.new_zeros(ctx.hidden_shape)
            grad_hidden[counted_rows // steps, counted_rows % steps] = grad_hidden_counted
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(weight.dtype),
            None,
            None,
            None,
            None,
        )
