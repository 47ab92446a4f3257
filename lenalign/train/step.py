"""One training step's loss, the code to copy from (see ``batch_loss``)::

    batch = collate_pairs(pairs, pad)        # 2B rows: B chosen, then B rejected
    logits = policy(input_ids, attention_mask).logits            # one forward, [2B, T, V]
    logps = sequence_logprobs(logits, input_ids, completion_mask, shift=True)
    out = preference_loss(chosen half, rejected half, reference halves, loss_type=...)
    out.loss.backward(); clip; AdamW step; warmup-cosine schedule step

With ``fused_head`` the backbone's hidden states and the LM head's weight go to
``linear_sequence_logprobs`` instead, and the logits are never formed
(``lenalign.integrations.hf``). The reference's log-probs come from a frozen copy of the
policy, or once before training (``precompute_reference``).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..api import linear_sequence_logprobs, sequence_logprobs
from ..integrations.hf import HeadInput, forward_head_input, forward_logits
from ..losses import PreferenceLossOutput, preference_loss, split_pairs
from ..outputs import SequenceLogProbs
from .config import TrainConfig, loss_options
from .dataset import PairLogProbs, PreferenceData, batches_in_order

# what a policy's forward hands to the loss: logits, the head's input, or (a model
# sharded with FSDP2, scored through the fused head) the rows' log-likelihoods
Outputs = torch.Tensor | HeadInput | SequenceLogProbs


def forward_outputs(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    amp: torch.dtype | None,
    fused_head: bool,
) -> Outputs:
    """The logits, or with ``fused_head`` the head's input, of a collated batch.

    A model sharded with FSDP2 (``distributed="fsdp"``) keeps its embeddings and head as
    shards outside its own forward, so its fused head runs inside it:
    ``lenalign.distributed.causal_lm_logprobs`` gives the log-likelihoods themselves.
    """
    if fused_head:
        if _is_sharded(model):
            from ..distributed import causal_lm_logprobs

            return causal_lm_logprobs(model, batch, amp=amp)
        return forward_head_input(model, batch, amp)
    return forward_logits(model, batch, amp)


def _is_sharded(model: torch.nn.Module) -> bool:
    # torch.distributed.fsdp is imported only once a process group exists
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def completion_logprobs(outputs: Outputs, batch: dict[str, torch.Tensor]) -> PairLogProbs:
    """Completion log-likelihoods of a batch's chosen and rejected rows.

    From the logits as the model returned them (``shift=True`` scores the token at t with
    the logits at t - 1, so nothing is sliced or copied), from the head's input, or
    already computed (``forward_outputs`` of a sharded model).
    """
    labels, mask = batch["input_ids"], batch["completion_mask"]
    if isinstance(outputs, SequenceLogProbs):
        return split_pairs(outputs)
    if isinstance(outputs, HeadInput):
        logps = linear_sequence_logprobs(
            outputs.hidden,
            outputs.weight,
            labels,
            mask,
            bias=outputs.bias,
            shift=True,
            **outputs.transform,
        )
    else:
        logps = sequence_logprobs(outputs, labels, mask, shift=True)
    return split_pairs(logps)


def batch_loss(
    outputs: Outputs,
    batch: dict[str, torch.Tensor],
    reference: PairLogProbs | None,
    config: TrainConfig,
) -> PreferenceLossOutput:
    """The preference loss of one batch from the policy's logits (or head input, see
    ``forward_outputs``); differentiable in them.

    ``reference`` holds the reference model's (chosen, rejected) log-probs of the same
    rows, or is None for a reference-free loss_type.
    """
    chosen, rejected = completion_logprobs(outputs, batch)
    ref_chosen, ref_rejected = reference if reference is not None else (None, None)
    return preference_loss(chosen, rejected, ref_chosen, ref_rejected, **loss_options(config))


@torch.no_grad()
def precompute_reference(
    model: PreTrainedModel,
    data: PreferenceData,
    batch_size: int,
    pad: int,
    amp: torch.dtype | None = None,
    fused_head: bool = False,
) -> PairLogProbs:
    """Reference (chosen, rejected) log-probs of every pair of ``data``, [N] each."""
    device = next(model.parameters()).device
    parts = [
        completion_logprobs(forward_outputs(model, batch, amp, fused_head), batch)
        for batch in batches_in_order(data, batch_size, pad, device)
    ]

    def stacked(side: int) -> SequenceLogProbs:
        columns = zip(*(part[side][:3] for part in parts), strict=True)
        return SequenceLogProbs(*(torch.cat(column) for column in columns))

    return stacked(0), stacked(1)


def reference_logprobs(
    batch: dict[str, torch.Tensor],
    data: PreferenceData,
    reference_model: PreTrainedModel | None,
    amp: torch.dtype | None,
    fused_head: bool,
) -> PairLogProbs | None:
    """The reference's (chosen, rejected) log-probs of an ``indexed_batch`` of ``data``:
    looked up when ``data.reference`` holds them, else computed by ``reference_model``,
    else None (a reference-free loss_type)."""
    if data.reference is not None:
        index = batch["index"]
        chosen, rejected = data.reference
        return (
            SequenceLogProbs(*(f[index] for f in chosen[:3])),
            SequenceLogProbs(*(f[index] for f in rejected[:3])),
        )
    if reference_model is None:
        return None
    with torch.no_grad():
        return completion_logprobs(forward_outputs(reference_model, batch, amp, fused_head), batch)
