"""TRL's ``model(..., labels=..., fused_lm_head=True)`` calls, answered by lenalign.

TRL 1.16 patches every trainer's model with ``trl.trainer.utils.add_fused_lm_head`` and
asks it for per-token log-probabilities (and entropies, mean logits) of the next-token
labels: ``model(**inputs, labels=labels, fused_lm_head=True)`` returns a
``FusedCausalLMOutput`` whose per-token fields are [B, T - 1], zero where the label is
-100. ``answer_fused_calls(model, ...)`` wraps the model's forward above TRL's, and
answers those calls with the same fields, computed by ``linear_sequence_logprobs`` on the
head's input (counted rows only, the statistics of ``TokenStats`` in the same pass), plus
lenalign's per-sequence ``SequenceLogProbs``. Every other call (generation, the model's
own loss) goes to the forward below, unchanged.

A trainer that sums the per-token log-probabilities of each completion (KTO, RLOO) gets
length-normalized scores from its own sum when ``length_exponent`` lambda is given: each
row's per-token log-probabilities are handed over divided by ``count**lambda``, so that
``log_probs.sum(-1)`` is sum / count**lambda, and its gradient is that of the normalized
score. Per-token quantities other than ``log_probs`` (entropy, mean logits) are never
weighted.

Entropy here is a statistic without gradient (as lenalign's TokenStats): a loss that
differentiates it (GRPO's entropy bonus) must not be answered from here.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers import PreTrainedModel, Trainer
from trl.trainer.utils import FusedCausalLMOutput

from ...checks import fail
from ...outputs import SequenceLogProbs
from ..hf import fused_head_transform
from .head import HeadRequest, _load_balancing_loss, _score_head

# set on a model whose forward answers fused calls: (the forward installed, its
# settings). Each TRL trainer wraps the forward again with its own head on top, so a
# model answered for an earlier trainer is answered again unless the forward on top is
# still lenalign's, with the same settings
ANSWERED_MARK = "_lenalign_fused_calls_answered"
# the label TRL (and Hugging Face's loss) leaves unscored
IGNORE_INDEX = -100
# the per-token fields of FusedCausalLMOutput, and the TokenStats field each one is
STAT_FIELDS = {
    "entropy": "entropy",
    "log_sum_sq_probs": "log_sum_sq_probs",
    "mean_logits": "mean_logits",
    "is_top1": "is_top1",
}


@dataclass
class LenalignFusedOutput(FusedCausalLMOutput):
    """TRL's FusedCausalLMOutput, every field as TRL defines it, plus lenalign's own.

    Attributes:
        sequence: SequenceLogProbs of the rows (``sum``, ``mean`` [B] float32, float64
            for a float64 model; ``count`` [B] int64), unweighted by ``length_exponent``.
    """

    sequence: SequenceLogProbs | None = None


def answer_fused_calls(
    model: PreTrainedModel,
    *,
    temperature: float = 1.0,
    float32_head: bool = False,
    length_exponent: float | None = None,
) -> PreTrainedModel:
    """Wrap ``model.forward`` (in place) to answer ``fused_lm_head=True`` calls; a model
    already answered with the same settings, its forward not wrapped since (as each TRL
    trainer wraps it with its own head), is left as it is.

    Args:
        model: the causal LM itself (not its PEFT or accelerate wrapper), whose forward
            TRL's ``add_fused_lm_head`` may already have wrapped.
        temperature: the logits are divided by it before the softmax, as TRL's head
            does (after the head's own scale and cap); a finite number > 0.
        float32_head: project in float32 outside autocast (``cast_lm_head_to_fp32``).
        length_exponent: lambda in [0, 1]: the per-token ``log_probs`` of each row are
            divided by the row's count of scored labels to the power lambda; None (or 0)
            leaves them as they are.

    Returns:
        ``model``, its forward wrapped.

    Raises:
        ValueError: naming the argument, for a temperature that is not a finite number
            > 0, and an LM head or logit transform lenalign does not reproduce.
    """
    settings = (temperature, float32_head, length_exponent)
    installed = getattr(model, ANSWERED_MARK, None)
    if installed is not None and installed == (model.__dict__.get("forward"), settings):
        return model
    transform = fused_head_transform(model, temperature)
    previous_forward = model.forward
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)
    def forward(
        self,
        *args,
        fused_lm_head: bool = False,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ):
        if not fused_lm_head:
            for name, value in (
                ("labels", labels),
                ("shift_labels", shift_labels),
                ("num_items_in_batch", num_items_in_batch),
            ):
                if value is not None:
                    kwargs[name] = value
            return previous_forward(*args, **kwargs)
        if labels is None and shift_labels is None:
            fail("labels", "a tensor of labels for a fused_lm_head=True call", None)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone = self.base_model(*args, **kwargs)
        request = HeadRequest(
            labels if shift_labels is None else shift_labels,
            token_logprobs=True,
            token_stats=True,
            shift=shift_labels is None,
            float32=float32_head,
        )
        logps = _score_head(self, backbone.last_hidden_state, request, transform)
        output = _fused_output(
            logps, request.labels, request.shift, num_items_in_batch, length_exponent
        )
        if kwargs.get("output_router_logits"):
            output.aux_loss = _load_balancing_loss(self, backbone, kwargs.get("attention_mask"))
            coefficient = getattr(text_config, "router_aux_loss_coef", 0.0)
            output.loss = output.loss + coefficient * output.aux_loss
        return output

    model.forward = types.MethodType(forward, model)
    setattr(model, ANSWERED_MARK, (model.forward, settings))
    return model


def answer_trainer_fused_calls(trainer: Trainer, **settings: float | bool | None) -> None:
    """``answer_fused_calls(model, **settings)`` on a TRL trainer's policy and reference
    (the causal LMs under their accelerate and PEFT wrappers, where TRL patched the
    heads); a second call with the same settings changes nothing."""
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is None:
            continue
        unwrapped = trainer.accelerator.unwrap_model(model)
        if is_peft_model(unwrapped):
            unwrapped = unwrapped.get_base_model()
        answer_fused_calls(unwrapped, **settings)


def _fused_output(
    logps: SequenceLogProbs,
    labels: torch.Tensor,
    shifted: bool,
    num_items_in_batch: torch.Tensor | int | None,
    length_exponent: float | None,
) -> LenalignFusedOutput:
    """FusedCausalLMOutput's fields from lenalign's [B, T] per-token outputs.

    TRL's per-token fields drop the first position when it shifts (no label is scored
    from before the sequence): [B, T - 1]. Its loss is the token-mean NLL, over
    ``num_items_in_batch`` when given."""
    start = 1 if shifted else 0
    token_logprobs = logps.token_logprobs[:, start:]
    label_mask = (labels[:, start:] != IGNORE_INDEX).to(token_logprobs.device)
    if num_items_in_batch is None:
        num_items_in_batch = label_mask.sum().clamp(min=1)
    loss = -token_logprobs.sum() / num_items_in_batch
    log_probs = token_logprobs
    if length_exponent:
        scale = logps.count.clamp(min=1).to(token_logprobs.dtype) ** -length_exponent
        log_probs = token_logprobs * scale[:, None]
    stats = {
        name: getattr(logps.token_stats, field)[:, start:] for name, field in STAT_FIELDS.items()
    }
    return LenalignFusedOutput(
        loss=loss,
        log_probs=log_probs,
        label_mask=label_mask,
        sequence=logps,
        **stats,
    )
