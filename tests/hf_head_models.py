"""Tiny Hugging Face causal LMs, one per head transform, built in code (nothing is
downloaded): the models whose logits ``fused_head_transform`` must reproduce.

``HEAD_FAMILIES`` names each family by the transform its head applies; ``build_head_model``
builds one with random weights from a seed, the head's weight scaled up so that the
scale and the cap change the log-likelihoods well beyond float error, or skips the test
where the installed transformers lacks the class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers

from lenalign.integrations.hf import transformers_at_least

# the sizes every family shares: 2 layers, 32 wide, 4 query and 2 key-value heads
SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# a vision tower of one layer for the multimodal wrappers, never run: the batches are text
TINY_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
TINY_VISION |= {"num_attention_heads": 2}


def _text(**fields: Any) -> Callable[[int], dict[str, Any]]:
    """A text config's fields for a vocabulary size: the shared sizes, then ``fields``."""
    return lambda vocab: {"vocab_size": vocab, **SIZES, **fields}


# family: (model class, config class, config fields for a vocabulary size, the transform
# expected at temperature 1). The numbers are picked not to be powers of two, so that a
# division taken for a multiplication, or the reverse, shows.
HEAD_FAMILIES: dict[str, tuple[str, str, Callable[[int], dict[str, Any]], dict]] = {
    "cohere": (
        "CohereForCausalLM",
        "CohereConfig",
        _text(logit_scale=0.3),
        {"logit_scale": 0.3, "logit_softcap": None},
    ),
    "granite": (
        "GraniteForCausalLM",
        "GraniteConfig",
        _text(logits_scaling=3.0),
        {"logit_scale": 1 / 3.0, "logit_softcap": None},
    ),
    "hyperclovax": (
        "HyperCLOVAXForCausalLM",
        "HyperCLOVAXConfig",
        _text(logits_scaling=0.4),
        {"logit_scale": 0.4, "logit_softcap": None},
    ),
    "falcon_h1": (
        "FalconH1ForCausalLM",
        "FalconH1Config",
        _text(
            lm_head_multiplier=0.4,
            mamba_d_ssm=32,
            mamba_n_heads=4,
            mamba_d_head=8,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_chunk_size=16,
        ),
        {"logit_scale": 0.4, "logit_softcap": None},
    ),
    # MiniCPM3 divides the hidden states by logits_scaling = hidden_size / dim_model_base
    "minicpm3": (
        "MiniCPM3ForCausalLM",
        "MiniCPM3Config",
        _text(
            num_key_value_heads=4,
            kv_lora_rank=8,
            q_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            dim_model_base=10,
        ),
        {"logit_scale": 10 / 32, "logit_softcap": None},
    ),
    "gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        _text(head_dim=8, final_logit_softcapping=3.0),
        {"logit_scale": 1.0, "logit_softcap": 3.0},
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        _text(head_dim=8, final_logit_softcapping=3.0),
        {"logit_scale": 1.0, "logit_softcap": 3.0},
    ),
    # output_multiplier, then the cap: Muse's head does both, in that order
    "muse_glimmer": (
        "MuseGlimmerForConditionalGeneration",
        "MuseGlimmerConfig",
        lambda vocab: {
            "text_config": _text(
                head_dim=8, output_multiplier=0.3, final_logit_softcapping=3.0, sliding_window=8
            )(vocab),
            "vision_config": {**TINY_VISION, "patch_size": 2, "pos_emb_height": 4},
            "out_hidden_size": 32,
            "projector_hidden_size": 32,
        },
        {"logit_scale": 0.3, "logit_softcap": 3.0},
    ),
    # a Cohere 2 text config whose logit_scale the wrapper's head applies from transformers
    # 5.25 on, and ignored before
    "aya_vision": (
        "AyaVisionForConditionalGeneration",
        "AyaVisionConfig",
        lambda vocab: {
            "text_config": {"model_type": "cohere2", **_text(logit_scale=0.3)(vocab)},
            "vision_config": {
                "model_type": "siglip_vision_model",
                **TINY_VISION,
                "image_size": 8,
                "patch_size": 4,
            },
        },
        {"logit_scale": 0.3 if transformers_at_least("5.25.0") else 1.0, "logit_softcap": None},
    ),
    # MptConfig's logit_scale, which transformers' MptForCausalLM does not apply
    "mpt": (
        "MptForCausalLM",
        "MptConfig",
        lambda vocab: {
            "vocab_size": vocab,
            "d_model": 32,
            "n_heads": 4,
            "n_layers": 2,
            "logit_scale": 0.3,
        },
        {"logit_scale": 1.0, "logit_softcap": None},
    ),
}


def build_head_model(family: str, vocab: int, seed: int) -> transformers.PreTrainedModel:
    """A float32 model of ``family`` over ``vocab`` tokens, the same weights for a seed.

    The head's weight is scaled by 30 (tied embeddings with it): with random weights of
    std 0.02 the logits would be too small for a scale or a cap to show. Skips the test
    where the installed transformers has no class for the family.
    """
    model_name, config_name, fields, _ = HEAD_FAMILIES[family]
    model_class = getattr(transformers, model_name, None)
    config_class = getattr(transformers, config_name, None)
    if model_class is None or config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = config_class(**fields(vocab))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model.eval()
