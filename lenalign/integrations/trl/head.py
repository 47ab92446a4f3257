"""A model forward that runs the backbone and scores the LM head's input with lenalign.

``install_lenalign_head(model)`` wraps ``model.forward``: called with
``lenalign_head=HeadRequest(...)``, it runs the backbone (``model.base_model``), takes
the hidden states entering the LM head and the head's weight and bias, and returns
``linear_sequence_logprobs`` of them (counted rows only, in chunks: no [R, T, V]
logits, and the head module's own forward is never called). Without that keyword the
previous forward runs, so generation and TRL's own calls are unchanged.

The scoring runs inside the model's forward, as TRL's fused head does, rather than after
it: wrappers that act around a forward (DDP's gradient hooks, PEFT's adapters, FSDP's
parameter gathering, accelerate's autocast) then see it as part of the model. DeepSpeed
ZeRO-3 among them: the head's weight, partitioned between the ranks outside a forward,
is read here without calling the head module, and ZeRO-3 gathers a parameter read so
inside a module's forward as an external parameter of that module (the causal LM),
releases it when that forward ends and gathers it again for its backward, where
lenalign's op reads it (docs/distributed.md, "DeepSpeed ZeRO-3").
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import is_peft_model
from packaging.version import Version
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ... import VocabShard, linear_sequence_logprobs
from ...outputs import SequenceLogProbs
from ..hf import fused_head_transform

# set on a model whose forward is wrapped, so that wrapping is done once
INSTALLED_MARK = "_lenalign_head_installed"


@dataclass(frozen=True)
class HeadRequest:
    """What the wrapped forward scores.

    Attributes:
        labels: [R, T] (padded) or [1, N] (packed) integer labels aligned with the input
            ids, -100 where not counted; the label at t is scored from position t - 1
            (the shift of Hugging Face's causal-LM loss).
        cu_seqlens: [S + 1] int32 boundaries of the packed sequences, None when padded.
        token_logprobs: also return the per-position log-probabilities.
        token_stats: also return lenalign's TokenStats (entropy, mean logit, top-1,
            log sum p**2), computed in the same pass, without gradient.
        shift: False for labels already aligned with the positions that score them
            (TRL's pre-shifted ``shift_labels``, under context or sequence parallelism).
        float32: project in float32 outside autocast (TRL's ``cast_lm_head_to_fp32``).
    """

    labels: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    token_logprobs: bool = False
    token_stats: bool = False
    shift: bool = True
    float32: bool = False


@dataclass
class HeadOutput(ModelOutput):
    """What the wrapped forward returns for a HeadRequest.

    Attributes:
        logps: lenalign's SequenceLogProbs of the R (or S packed) sequences: ``sum``,
            ``mean`` [R] float32 (float64 for a float64 model), ``count`` [R] int64, and
            the requested per-position fields in the labels' shape.
        aux_loss: [] the MoE load-balancing loss, when router logits were requested.
    """

    logps: SequenceLogProbs | None = None
    aux_loss: torch.Tensor | None = None


def install_lenalign_head(model: PreTrainedModel) -> PreTrainedModel:
    """Wrap ``model.forward`` (in place, once) so that it accepts ``lenalign_head=``.

    ``model`` is the causal LM itself, under any PEFT, DDP or accelerate wrapper; its
    head transform (``lenalign.integrations.hf.fused_head_transform``) is read here, so a
    head that lenalign cannot reproduce is refused before training starts.

    Raises:
        ValueError: from ``fused_head_transform``, for a head that is not an
            ``nn.Linear`` or a logit transform outside the mapped ones.
    """
    if getattr(model, INSTALLED_MARK, False):
        return model
    transform = fused_head_transform(model)
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    # as TRL's add_fused_lm_head: before transformers 5, vision-language models expose
    # their language backbone as ``model`` rather than through base_model_prefix
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"

    # the original signature stays visible: generate() validates its kwargs against it
    @functools.wraps(type(model).forward)
    def forward(self, *args, lenalign_head: HeadRequest | None = None, **kwargs):
        if lenalign_head is None:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        outputs = getattr(self, backbone_attr)(*args, **kwargs)
        logps = _score_head(self, outputs.last_hidden_state, lenalign_head, transform)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(self, outputs, kwargs.get("attention_mask"))
        return HeadOutput(logps=logps, aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)
    setattr(model, INSTALLED_MARK, True)
    return model


def install_under_wrappers(model: torch.nn.Module, accelerator: Accelerator) -> PreTrainedModel:
    """``install_lenalign_head`` on the causal LM under ``model``'s accelerate (DDP, FSDP)
    and PEFT wrappers; that causal LM is returned."""
    unwrapped = accelerator.unwrap_model(model)
    if is_peft_model(unwrapped):
        unwrapped = unwrapped.get_base_model()
    return install_lenalign_head(unwrapped)


def _score_head(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    request: HeadRequest,
    transform: dict[str, float | None],
) -> SequenceLogProbs:
    """linear_sequence_logprobs of the [R, T', H] backbone output against the head."""
    # prompt-learning PEFT prepends virtual tokens to the outputs: keep the real ones
    hidden = hidden[:, -request.labels.shape[1] :]
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    vocab_shard = None
    if isinstance(weight, DTensor):
        if _split_over_vocabulary(model, weight):
            vocab_shard = VocabShard.from_dtensor(weight)
        else:
            # an FSDP2 shard outside its unit's forward: the kernels take the gathered
            # head (as TRL's does)
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
    # with the model split across devices the backbone can end elsewhere than the head
    hidden = hidden.to(weight.device)
    device_type = weight.device.type
    if request.float32:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    elif torch.is_autocast_enabled(device_type):
        # under autocast the model's head would multiply in the autocast dtype; lenalign
        # forms the logits in its inputs' dtype (statistics in float32 either way)
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    cu_seqlens = request.cu_seqlens
    # float32 means float32 whatever autocast the trainer entered around the forward
    with torch.autocast(device_type, enabled=False) if request.float32 else nullcontext():
        return linear_sequence_logprobs(
            hidden,
            weight,
            request.labels.to(weight.device),
            bias=bias,
            shift=request.shift,
            cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(weight.device),
            return_token_logprobs=request.token_logprobs,
            return_token_stats=request.token_stats,
            vocab_shard=vocab_shard,
            **transform,
        )


def _split_over_vocabulary(model: PreTrainedModel, weight: DTensor) -> bool:
    """Whether the head's DTensor weight is a tensor-parallel split of the vocabulary
    (ColwiseParallel's Shard(0) on a 1-D mesh, transformers' ``tp_plan``) rather than an
    FSDP2 shard, which is Shard(0) on a 1-D mesh too: told apart by FSDP2's modules,
    present in the model only under FSDP. A model under both gathers the head."""
    on_vocab = weight.device_mesh.ndim == 1 and tuple(weight.placements) == (Shard(0),)
    return on_vocab and not any(isinstance(module, FSDPModule) for module in model.modules())


def _load_balancing_loss(
    model: PreTrainedModel, outputs: ModelOutput, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The MoE router loss that the model's own forward would add (Mixtral's, which every
    MoE family in transformers reuses), unweighted: the trainer weights it."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = model.config.get_text_config()
    num_experts = getattr(text_config, "num_experts", None)
    if num_experts is None:
        num_experts = getattr(text_config, "num_local_experts", None) or model.num_experts
    top_k = getattr(text_config, "num_experts_per_tok", None) or model.num_experts_per_tok
    return load_balancing_loss_func(outputs.router_logits, num_experts, top_k, attention_mask)
