"""The embedded model: a tiny Llama and a byte-level tokenizer, both built in code.

They make ``lenalign train`` runnable with no download and no file: the tokenizer needs
no vocabulary file (a byte is a token), the model is a Llama architecture from a
``LlamaConfig`` with seeded random weights. Both save and load with the ordinary
Hugging Face calls, so a checkpoint of the tiny model is used like any other.
"""

from __future__ import annotations

import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

# Sized so that a few hundred preference steps take seconds on one CPU core, while two
# attention layers are enough to condition a completion on its prompt.
TINY_HIDDEN_SIZE = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_INTERMEDIATE_SIZE = 176
# positions are rotary (no parameters), so a generous limit costs nothing
TINY_MAX_POSITIONS = 2048


def build_byte_tokenizer() -> ByT5Tokenizer:
    """A UTF-8 byte tokenizer: 0 ``<pad>``, 1 ``</s>`` (EOS), 2 ``<unk>``, 3 + b for byte b.

    It is transformers' ``ByT5Tokenizer`` without ByT5's 125 sentinel tokens (259 ids in
    all), a real Hugging Face tokenizer: ``save_pretrained`` writes it and
    ``AutoTokenizer.from_pretrained`` reads it back. It has no BOS token.
    """
    return ByT5Tokenizer(extra_ids=0)


def build_tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A 2-layer, 64-wide Llama for ``tokenizer``'s vocabulary, random weights from ``seed``.

    About 117k parameters with the byte tokenizer. The same seed gives the same weights,
    which is what lets a resumed run rebuild its reference model. The global RNG is left
    as it was.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN_SIZE,
        intermediate_size=TINY_INTERMEDIATE_SIZE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_HEADS,
        max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
