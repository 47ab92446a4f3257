"""Hugging Face causal LMs as lenalign's ops take them: the logits, or the LM head's input.

``forward_logits`` runs the whole model; ``forward_head_input`` stops before the LM head
and hands its input and parameters to ``linear_sequence_logprobs``, so the logits are
never formed. ``fused_head_transform`` says how a model's head scales or caps its
logits, and refuses the heads whose logits that op would not reproduce.

Only torch is imported here: the models come from the caller, so transformers is needed
for type hints alone.
"""

from __future__ import annotations

import functools
import importlib.metadata
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..checks import fail, positive_finite

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

# The head transforms of transformers' causal LMs (5.24, models/<family>/modeling_*.py),
# by text-config field; +1 multiplies the logits by the field, -1 divides them by it.
# They are the fields TRL 1.16's fused head reads (trl/trainer/utils.py,
# add_fused_lm_head); no config class in transformers defines two of them.
#   logit_scale         Cohere, Cohere 2 (MoE), Cohere Compass: `logits * self.logit_scale`
#   output_multiplier   Muse Spark, Muse Glimmer: `logits * ...output_multiplier`, then capped
#   lm_head_multiplier  Falcon-H1: `self.lm_head(hidden_states) * self.model.lm_head_multiplier`
#   logits_scaling      Granite and its MoE, SWA, vision and docling kin:
#                       `logits / self.config.logits_scaling`; MiniCPM3 divides the hidden
#                       states by it before its bias-free head, the same up to rounding
LOGIT_SCALE_FIELDS: dict[str, int] = {
    "logit_scale": 1,
    "output_multiplier": 1,
    "lm_head_multiplier": 1,
    "logits_scaling": -1,
}
# text-config model types that multiply by logits_scaling instead: HyperCLOVA X and its
# vision model, `self.lm_head(hidden_states) * self.config.logits_scaling`
MULTIPLYING_LOGITS_SCALING = frozenset({"hyperclovax"})
# model types whose heads both scale and cap, checked to scale first as
# linear_sequence_logprobs does: `logits * output_multiplier`, then `/ cap`, tanh, `* cap`.
# Both from any other model type are refused, as the order would be a guess.
SCALE_THEN_CAP_MODEL_TYPES = frozenset({"muse_spark_text", "muse_glimmer_text"})
# models whose head ignores a field their text config carries, by the top-level config's
# model type: each wrapper's forward ends at `logits = self.lm_head(hidden_states)`. The
# second entry is the first transformers release whose head applies the fields, if any.
IGNORED_BY_HEAD: dict[str, tuple[tuple[str, ...], str | None]] = {
    # a Cohere 2 text config; transformers 5.25 multiplies by it
    "aya_vision": (("logit_scale",), "5.25.0"),
    "cohere2_vision": (("logit_scale",), None),  # a Cohere 2 text config
    "granite_speech": (("logits_scaling",), None),  # a Granite text config
    "granite_speech_plus": (("logits_scaling",), None),  # a Granite text config
    "gemma3": (("final_logit_softcapping",), None),  # Gemma3ForConditionalGeneration
    # MptConfig keeps MosaicML's logit_scale, which transformers' MptForCausalLM never
    # applies (MosaicML's remote code, with a config class of its own, does)
    "mpt": (("logit_scale",), None),
}


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


def fused_head_transform(
    model: PreTrainedModel, temperature: float = 1.0
) -> dict[str, float | None]:
    """``linear_sequence_logprobs``'s logit_scale and logit_softcap for ``model``'s head.

    The scale is the product of the config's multipliers (``logit_scale``,
    ``output_multiplier``, ``lm_head_multiplier``, and ``logits_scaling`` for HyperCLOVA X),
    divided by its divisors (``logits_scaling`` elsewhere) and by ``temperature``; the cap
    is ``final_logit_softcapping`` (the Gemma family, Muse), over ``temperature``. These are
    the transforms of TRL's fused head, read as each family's model code applies them
    (LOGIT_SCALE_FIELDS, IGNORED_BY_HEAD).

    Args:
        model: a causal LM, or a wrapper (PEFT) that forwards ``config`` and
            ``get_output_embeddings``.
        temperature: the final logits are divided by it, as sampling does; a finite
            number > 0.

    Raises:
        ValueError: a head that is not an ``nn.Linear``, a transform field that is not a
            finite number > 0, or a head that both scales and caps in an order not
            checked (SCALE_THEN_CAP_MODEL_TYPES).
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        kind = type(head).__name__
        raise ValueError(f"fused_head: expected a model whose LM head is nn.Linear, got {kind}")
    temperature = positive_finite("temperature", temperature)
    text_config = model.config.get_text_config()
    model_type = getattr(text_config, "model_type", None)
    ignored = _ignored_fields(model.config, text_config)
    scale = 1.0
    scaled_by: list[str] = []  # the fields that do scale, for the error below
    for name, power in LOGIT_SCALE_FIELDS.items():
        value = getattr(text_config, name, None)
        if value is None or name in ignored:
            continue
        factor = positive_finite(f"fused_head: config.{name}", value)
        if name == "logits_scaling" and model_type in MULTIPLYING_LOGITS_SCALING:
            power = 1
        scale = scale * factor if power > 0 else scale / factor
        if factor != 1:
            scaled_by.append(f"{name}={value}")
    softcap = getattr(text_config, "final_logit_softcapping", None)
    if "final_logit_softcapping" in ignored:
        softcap = None
    if softcap is not None:
        softcap = positive_finite("fused_head: config.final_logit_softcapping", softcap)
        if scaled_by and model_type not in SCALE_THEN_CAP_MODEL_TYPES:
            fail(
                "fused_head",
                f"a model whose head scales then caps its logits (model types "
                f"{sorted(SCALE_THEN_CAP_MODEL_TYPES)}), or does one of the two",
                f"model type {model_type!r} with {', '.join(scaled_by)} and "
                f"final_logit_softcapping={softcap}; train it with fused_head off",
            )
    # dividing the capped logits by T is c tanh(s z / c) / T = (c/T) tanh((s/T) z / (c/T)):
    # both kwargs take the temperature
    return {
        "logit_scale": scale / temperature,
        "logit_softcap": None if softcap is None else softcap / temperature,
    }


def _ignored_fields(config: PreTrainedConfig, text_config: PreTrainedConfig) -> tuple[str, ...]:
    """The transform fields of ``text_config`` that the model's head does not apply."""
    model_type = getattr(config, "model_type", None)
    # MosaicML's remote MPT has model type "mpt" too, with its own config class, and
    # multiplies by logit_scale; only transformers' MptConfig goes with the class ignoring it
    if model_type == "mpt" and not type(text_config).__module__.startswith("transformers."):
        return ()
    fields, applied_since = IGNORED_BY_HEAD.get(model_type, ((), None))
    if applied_since is not None and transformers_at_least(applied_since):
        return ()
    return fields


@functools.cache
def transformers_at_least(release: str) -> bool:
    """Whether the installed transformers is ``release`` or newer, its pre-releases and
    development builds included (5.25.0.dev0 counts as 5.25: a build from the branch that
    became the release behaves as it does). Its models come from there: a caller holding
    one has it."""
    from packaging.version import Version

    installed = Version(importlib.metadata.version("transformers"))
    return installed.release >= Version(release).release


def backbone_hidden(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """[R, T, H] hidden states that the model's backbone hands its LM head, under
    autocast to ``amp`` when given; the head itself does not run."""
    with amp_context(input_ids.device, amp):
        outputs = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
    return outputs.last_hidden_state


def forward_head_input(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], amp: torch.dtype | None = None
) -> HeadInput:
    """The hidden states entering the model's LM head, with the head's parameters.

    Under autocast the head's matmul would run in ``amp``: the three are cast to it here,
    since ``linear_sequence_logprobs`` forms the logits in its inputs' dtype.
    """
    transform = fused_head_transform(model)
    hidden = backbone_hidden(model, batch["input_ids"], batch["attention_mask"], amp)
    head = model.get_output_embeddings()
    parts = (hidden, head.weight, head.bias)
    if amp is not None:
        parts = tuple(None if part is None else part.to(amp) for part in parts)
    return HeadInput(*parts, transform)
