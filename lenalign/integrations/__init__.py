"""Adapters between lenalign's ops and other libraries' models and trainers.

The core (``lenalign.sequence_logprobs`` and the losses) takes tensors; this wing turns
another library's objects into them. ``lenalign.integrations.hf`` runs a Hugging Face
causal LM forward to its logits, or to its LM head's input for
``linear_sequence_logprobs``; the reference trainer (``lenalign.train``) scores its
batches through it. ``lenalign.integrations.trl`` (``LenalignDPOConfig``,
``LenalignDPOTrainer``) switches TRL's DPOTrainer onto lenalign; it needs the ``[trl]``
extra and is not imported by this package.

Public names: ``HeadInput``, ``forward_logits``, ``forward_head_input``,
``backbone_hidden`` (the hidden states entering the head, without the head),
``fused_head_transform`` (a model's head transforms, and a sampling temperature, as
``linear_sequence_logprobs``'s ``logit_scale`` and ``logit_softcap``) and
``amp_context``, all from ``lenalign.integrations.hf``, which imports torch only (not
transformers).
"""

from .hf import (
    HeadInput,
    amp_context,
    backbone_hidden,
    forward_head_input,
    forward_logits,
    fused_head_transform,
)

__all__ = [
    "HeadInput",
    "amp_context",
    "backbone_hidden",
    "forward_head_input",
    "forward_logits",
    "fused_head_transform",
]
