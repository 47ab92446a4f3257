"""Fixtures of the trainer's tests: the embedded byte tokenizer and a Llama-like one."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from lenalign.train import build_byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def word_tokenizer():
    """A Llama-like tokenizer built in code: a BOS and an EOS, no padding token."""
    words = ["<s>", "</s>", "<unk>", "upper", "lower", ":", "a", "b", "c", "A", "B", "C"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
