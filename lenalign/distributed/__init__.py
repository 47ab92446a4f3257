"""Data-parallel training with the fused LM head: FSDP2 (``fully_shard``) and DDP.

``linear_sequence_logprobs`` reads the LM head's weight in its forward and again in its
backward. Under FSDP2 that weight is a sharded DTensor except while the unit that owns
it runs a forward, and under DDP gradients are all-reduced only for work that ran
through DDP's ``forward``. This wing runs the fused head where each expects it, with
torch.distributed's own machinery (``register_fsdp_forward_method``, DDP's forward):

- ``causal_lm_logprobs(model, batch)``: a Hugging Face causal LM's completion
  log-likelihoods of a collated batch, backbone and fused head as one forward of the
  model, sharded with ``fully_shard`` or not;
- ``CausalLMLogProbs(model)``: the same as a module's ``forward(batch)``, to wrap in
  ``DistributedDataParallel`` (or to call whatever the parallelism);
- ``head_logprobs(model, hidden, labels, mask)``: the fused head alone, inside the
  forward of the FSDP unit that shards it;
- ``run_as_forward(module, function, *args)``: any function as a forward of an FSDP unit.

It needs torch.distributed (torch >= 2.6 for ``torch.distributed.fsdp.fully_shard``) and
is not imported by ``import lenalign``. See docs/distributed.md, "FSDP2 and DDP".
"""

from .fsdp import owning_unit, run_as_forward
from .head import CausalLMLogProbs, causal_lm_logprobs, head_logprobs

__all__ = [
    "CausalLMLogProbs",
    "causal_lm_logprobs",
    "head_logprobs",
    "owning_unit",
    "run_as_forward",
]
