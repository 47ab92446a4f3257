"""The fused LM head of a Hugging Face causal LM under FSDP2 or DDP.

``head_logprobs`` runs ``linear_sequence_logprobs`` on a model's LM head inside the
forward of the FSDP2 unit that shards it (``fsdp.run_as_forward``), so the weight it
reads is the gathered one, in the forward and again in the backward, and its gradient
is reduce-scattered like any other. ``causal_lm_logprobs`` runs the whole model, the
backbone and the fused head, as one forward of the model: under the usual recipe
(``fully_shard`` on each decoder layer, then on the model) the embeddings, the final
norm and the head belong to the root unit, which ``model.base_model(...)`` alone would
leave sharded. ``CausalLMLogProbs`` is the same computation as a module's ``forward``,
which is what DDP needs: it all-reduces only the gradients of work that ran through its
own ``forward``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..api import linear_sequence_logprobs
from ..checks import fail
from ..integrations.hf import backbone_hidden, fused_head_transform
from ..outputs import SequenceLogProbs
from .fsdp import check_unsharded, owning_unit, run_as_forward

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# linear_sequence_logprobs's keywords that head_logprobs reads from the model instead
FROM_THE_MODEL = ("bias", "logit_scale", "logit_softcap")
BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")


def head_logprobs(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    amp: torch.dtype | None = None,
    **options: Any,
) -> SequenceLogProbs:
    """``linear_sequence_logprobs`` of ``hidden`` through ``model``'s LM head, sharded or not.

    The head's weight and bias are read, and the logits computed, inside the forward of
    the FSDP2 unit that owns the head (the head itself when ``fully_shard`` was applied
    to it, else its nearest sharded ancestor, such as the root); outside any FSDP unit
    this is a plain call. The head's transforms (``fused_head_transform``) are applied.

    Args:
        model: a causal LM (or a wrapper forwarding ``config`` and
            ``get_output_embeddings``), sharded with ``fully_shard`` or not.
        hidden: [B, T, H] (or packed [N, H] with ``cu_seqlens``) hidden states entering
            the head, floating point; the head's dtype unless ``amp`` is set.
        labels: [B, T] integer labels, ``mask``: optional [B, T] bool or integer mask, as
            for ``linear_sequence_logprobs``.
        amp: cast the hidden states, weight and bias to this dtype first, as
            ``forward_head_input`` does under autocast; None keeps them.
        **options: any other keyword of ``linear_sequence_logprobs`` (``shift``,
            ``ignore_index``, ``cu_seqlens``, ``return_token_logprobs``, ``chunk_rows``,
            ``backend``, ...) but ``bias``, ``logit_scale`` and ``logit_softcap``, which
            come from the model.

    Returns:
        SequenceLogProbs (``sum``, ``mean`` [S] float32, or float64 for float64 hidden
        states; ``count`` [S] int64), differentiable in ``hidden`` and the head.

    Raises:
        ValueError: naming the argument, for what ``linear_sequence_logprobs`` and
            ``fused_head_transform`` refuse, a keyword the model provides, or a head
            weight still sharded inside its unit's forward.
    """
    for name in FROM_THE_MODEL:
        if name in options:
            fail(name, "no value (head_logprobs reads it from the model)", repr(options[name]))
    transform = fused_head_transform(model)
    head = model.get_output_embeddings()
    unit = owning_unit(model, head)
    run = partial(_head_forward, head, unit, amp, {**transform, **options})
    if unit is None:
        return run(hidden, labels, mask)
    return run_as_forward(unit, run, hidden, labels, mask)


def _head_forward(
    head: nn.Linear,
    unit: nn.Module | None,
    amp: torch.dtype | None,
    options: dict[str, Any],
    hidden: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
) -> SequenceLogProbs:
    """The fused head, run where the unit's parameters are gathered: read them now."""
    weight, bias = head.weight, head.bias
    check_unsharded("weight", weight, unit)
    check_unsharded("bias", bias, unit)
    if amp is not None:
        hidden, weight = hidden.to(amp), weight.to(amp)
        bias = None if bias is None else bias.to(amp)
    return linear_sequence_logprobs(hidden, weight, labels, mask, bias=bias, **options)


def causal_lm_logprobs(
    model: PreTrainedModel,
    batch: Mapping[str, torch.Tensor],
    *,
    amp: torch.dtype | None = None,
    **options: Any,
) -> SequenceLogProbs:
    """Completion log-likelihoods of a collated batch, through the fused head, as one
    forward of ``model``: plain, or sharded with FSDP2.

    The backbone (``model.base_model``) and then ``head_logprobs`` run inside the
    model's own FSDP forward hooks when ``model`` is an FSDP unit, so that the
    parameters of the root unit (embeddings, final norm, the LM head) are gathered;
    decoder layers sharded on their own gather themselves as in ``model(...)``. A
    trainer scores its policy with it as it would with the logits::

        logps = causal_lm_logprobs(policy, batch)  # batch from collate_pairs
        chosen, rejected = split_pairs(logps)
        preference_loss(chosen, rejected, ...).loss.backward()

    Under DDP use ``DistributedDataParallel(CausalLMLogProbs(model))`` instead: DDP
    syncs the gradients of its own ``forward`` only, and ``model`` here is refused.

    Args:
        model: a Hugging Face causal LM whose head is an ``nn.Linear``, with
            ``fully_shard`` applied to it (and usually to its decoder layers first), or
            not sharded at all.
        batch: ``input_ids``, ``attention_mask`` [R, T] int64 and ``completion_mask``
            [R, T] bool, as ``collate_pairs`` makes them (other keys are ignored); the
            label at t, ``input_ids[:, t]``, is scored with the hidden state at t - 1 and
            counted where ``completion_mask`` is true.
        amp: autocast dtype of the forward (None: the parameters' dtype), as for
            ``forward_head_input``.
        **options: keywords of ``linear_sequence_logprobs`` (``chunk_rows``,
            ``backend``, ``return_token_logprobs``, ...) but ``shift`` (always True) and
            those ``head_logprobs`` refuses.

    Returns:
        SequenceLogProbs of the R rows (``sum``, ``mean`` [R] float32, ``count`` [R]
        int64); ``split_pairs`` splits a pair batch into chosen and rejected.

    Raises:
        ValueError: naming the argument, for a DDP-wrapped model, a batch without the
            three tensors, or what ``head_logprobs`` refuses.
    """
    if isinstance(model, DistributedDataParallel):
        fail(
            "model",
            "the causal LM itself: DDP all-reduces the gradients of its own forward only; "
            "wrap DistributedDataParallel(CausalLMLogProbs(model)) and call that",
            "a DistributedDataParallel",
        )
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        fail("batch", f"a mapping with {', '.join(BATCH_KEYS)}", f"one without {missing}")
    tensors = tuple(batch[key] for key in BATCH_KEYS)
    return run_as_forward(model, partial(_causal_lm_forward, model, amp, options), *tensors)


def _causal_lm_forward(
    model: PreTrainedModel,
    amp: torch.dtype | None,
    options: dict[str, Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> SequenceLogProbs:
    """Backbone then fused head; the backbone call is ``forward_head_input``'s."""
    hidden = backbone_hidden(model, input_ids, attention_mask, amp)
    # head_logprobs reads the head inside its unit's forward: this one when the model's
    # root unit owns it, the head's own when fully_shard was applied to the head alone
    return head_logprobs(
        model,
        hidden,
        input_ids,
        completion_mask,
        amp=amp,
        shift=True,
        **options,
    )


class CausalLMLogProbs(nn.Module):
    """A causal LM whose ``forward(batch)`` is ``causal_lm_logprobs(model, batch)``.

    For DDP, which all-reduces the gradients of work run through its own ``forward``:
    ``DistributedDataParallel(CausalLMLogProbs(model))(batch)`` gives the
    SequenceLogProbs of a rank's share of the batch, and the backward of a loss averaged
    over that share averages the gradients over the ranks as well (equal shares give
    the mean over the whole batch). It works unwrapped and with a sharded ``model``
    too, so a trainer can call one module whatever the parallelism. Its only parameters
    are the model's, under the ``model.`` prefix: save ``wrapper.model``.

    Args:
        model: as for ``causal_lm_logprobs``.
        amp, **options: passed to ``causal_lm_logprobs`` on every call.
    """

    def __init__(
        self, model: PreTrainedModel, *, amp: torch.dtype | None = None, **options: Any
    ) -> None:
        super().__init__()
        self.model = model
        self.amp = amp
        self.options = options

    def forward(self, batch: Mapping[str, torch.Tensor]) -> SequenceLogProbs:
        """SequenceLogProbs [R] of a collated batch (``input_ids``, ``attention_mask``,
        ``completion_mask`` [R, T]); see ``causal_lm_logprobs``."""
        return causal_lm_logprobs(self.model, batch, amp=self.amp, **self.options)
