"""Padding-free batches: a padded preference batch packed into one row, and back.

TRL's collator pads the 2B sequences (B prompt + chosen, then B prompt + rejected) to one
length. ``pack_batch`` drops the padding and lays the sequences end to end in a single
row with ``position_ids`` restarting at 0 for each, ``cu_seqlens`` marking where each
begins (FlashAttention's varlen convention), which is what lenalign's per-sequence
reduction takes. transformers keeps attention within each packed sequence from those
restarting positions: flash attention through its varlen kernels; sdpa, eager and flex
attention through a block-diagonal mask, which they build only when no
``attention_mask`` and no cache is passed (``transformers.masking_utils``).
``check_packed_attention`` refuses the attention implementations that would not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ...checks import fail
from ...outputs import SequenceLogProbs, TokenStats

# the attention implementations that isolate packed sequences given restarting
# position_ids, no attention_mask and no cache (transformers 5); the flash family is
# matched by name (flash_attention_2/3, and the Hub kernels of flash-attn)
PACKED_MASK_ATTENTION = ("eager", "sdpa", "flex_attention")
PACKED_VARLEN_MARKERS = ("flash_attention", "flash-attn", "flash_attn")


@dataclass(frozen=True)
class PackedBatch:
    """2B sequences of a padded [2B, T] batch laid end to end in one row of N tokens.

    Attributes:
        input_ids: [1, N] the tokens, padding removed.
        position_ids: [1, N] each token's position within its own sequence.
        labels: [1, N] the labels at the same positions.
        cu_seqlens: [2B + 1] int32 sequence boundaries in the row.
        index: [N] int64 flat indices of the packed tokens in the padded [2B * T] batch.
        padded_shape: (2B, T).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    index: torch.Tensor
    padded_shape: tuple[int, int]

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """[1, N] (or [N]) per-token values at their padded places, [2B, T], 0 elsewhere."""
        flat = values.new_zeros(self.padded_shape[0] * self.padded_shape[1])
        flat[self.index] = values.reshape(-1)
        return flat.view(self.padded_shape)


def pack_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> PackedBatch:
    """Pack the tokens where ``attention_mask`` is 1, row by row, into one row.

    Args:
        input_ids: [2B, T] token ids, right-padded as TRL's DataCollatorForPreference
            pads them (each row's tokens first, then padding).
        attention_mask: [2B, T] 1 at tokens, 0 at padding.
        labels: [2B, T] the labels, -100 where not counted.

    Returns:
        PackedBatch with N = attention_mask.sum() tokens.
    """
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1)
    index = keep.reshape(-1).nonzero().squeeze(1)
    cu_seqlens = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    positions = torch.arange(index.shape[0], device=index.device) - starts
    return PackedBatch(
        input_ids=input_ids.reshape(-1)[index].unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        labels=labels.reshape(-1)[index].unsqueeze(0),
        cu_seqlens=cu_seqlens,
        index=index,
        padded_shape=(input_ids.shape[0], input_ids.shape[1]),
    )


def check_packed_attention(model: PreTrainedModel, role: str) -> None:
    """Refuse ``padding_free=True`` for a model whose attention would mix packed sequences.

    Args:
        model: the causal LM (unwrapped from PEFT) that will see packed rows.
        role: "model" or "ref_model", for the message.

    Raises:
        ValueError: naming padding_free, for an attention implementation that does not
            isolate sequences from restarting position_ids.
    """
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    varlen = any(marker in implementation for marker in PACKED_VARLEN_MARKERS)
    if implementation not in PACKED_MASK_ATTENTION and not varlen:
        fail(
            "padding_free",
            f"a {role} whose attention keeps packed sequences apart (attn_implementation "
            f"one of {PACKED_MASK_ATTENTION} or flash attention)",
            f"attn_implementation={implementation!r}; set padding_free=False or load the "
            "model with one of those",
        )


def unpack_logps(logps: SequenceLogProbs, packed: PackedBatch) -> SequenceLogProbs:
    """``logps`` of a packed row with its per-token fields put back in the padded
    [2B, T] layout (the per-sequence fields are the same either way)."""
    token_logprobs = logps.token_logprobs
    if token_logprobs is not None:
        token_logprobs = packed.unpack(token_logprobs)
    stats = logps.token_stats
    if stats is not None:
        stats = TokenStats(*(packed.unpack(field) for field in stats))
    return logps._replace(token_logprobs=token_logprobs, token_stats=stats)
