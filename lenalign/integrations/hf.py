"""Hugging Face causal LMs as lenalign's ops take them: the logits, or the LM head's input.

``forward_logits`` runs the whole model; ``forward_head_input`` stops before the LM head
and hands its input and parameters to ``linear_sequence_logprobs``, so the logits are
never formed. ``fused_head_transform`` says how a model's head scales or caps its
logits, and refuses the heads whose logits that op would not reproduce.

Only torch is imported here: the models come from the caller, so transformers is needed
for type hints alone.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# config fields by which some architectures change the head's output, in ways that
# linear_sequence_logprobs does not reproduce (Granite, Falcon-H1, Muse, HyperCLOVA X)
UNSUPPORTED_LOGIT_TRANSFORMS = ("logits_scaling", "output_multiplier", "lm_head_multiplier")


def amp_context(device: torch.device, amp: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` to ``amp`` on ``device``'s type; a no-op context for None (fp32)."""
    if amp is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


def forward_logits(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], amp: torch.dtype | None = None
) -> torch.Tensor:
    """The model's [2B, T, V] logits of a collated batch, under autocast when ``amp`` is set."""
    device = batch["input_ids"].device
    with amp_context(device, amp):
        outputs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
    return outputs.logits


@dataclass(frozen=True)
class HeadInput:
    """What the LM head receives, for ``linear_sequence_logprobs``: [2B, T, H] hidden
    states, the head's [V, H] weight and [V] bias or None, and the keyword arguments that
    reproduce the model's scaling and capping of its logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: dict[str, float | None]


def fused_head_transform(model: PreTrainedModel) -> dict[str, float | None]:
    """``linear_sequence_logprobs``'s logit_scale and logit_softcap for ``model``'s head.

    Cohere multiplies its logits by ``config.logit_scale``; the Gemma family caps them
    with ``config.final_logit_softcapping``. A head that is not an ``nn.Linear``, or a
    config with any other logit transform, is refused: its logits would not be formed.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        kind = type(head).__name__
        raise ValueError(f"fused_head: expected a model whose LM head is nn.Linear, got {kind}")
    text_config = model.config.get_text_config()
    for name in UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1:
            raise ValueError(
                f"fused_head: expected a model whose logits are (hidden @ W.T + b) scaled by "
                f"logit_scale and capped by final_logit_softcapping, got one with "
                f"{name}={value}; train it with fused_head off"
            )
    scale = getattr(text_config, "logit_scale", None)
    return {
        "logit_scale": 1.0 if scale is None else float(scale),
        "logit_softcap": getattr(text_config, "final_logit_softcapping", None),
    }


def forward_head_input(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], amp: torch.dtype | None = None
) -> HeadInput:
    """The hidden states entering the model's LM head, with the head's parameters.

    Under autocast the head's matmul would run in ``amp``: the three are cast to it here,
    since ``linear_sequence_logprobs`` forms the logits in its inputs' dtype.
    """
    transform = fused_head_transform(model)
    device = batch["input_ids"].device
    with amp_context(device, amp):
        outputs = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
    head = model.get_output_embeddings()
    parts = (outputs.last_hidden_state, head.weight, head.bias)
    if amp is not None:
        parts = tuple(None if part is None else part.to(amp) for part in parts)
    return HeadInput(*parts, transform)
