"""GRPO's and RLOO's runs on the tests' tiny models: prompts, a fixed reward, a policy
saved to disk (with beta > 0 the trainers build the reference from the policy's path),
and the trainer (for test_trl_rl.py and the multi-process runs of trl_ddp_run.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

from datasets import Dataset
from trl_helpers import config_kwargs, tiny_model, tokenizer

GENERATIONS = 2
COMPLETION_TOKENS = 8
# GRPO and RLOO: 2 prompts x 2 completions a step, short completions
RL_FIELDS = {
    "per_device_train_batch_size": 2 * GENERATIONS,
    "num_generations": GENERATIONS,
    "max_completion_length": COMPLETION_TOKENS,
}


def prompt_dataset(n: int = 8) -> Dataset:
    """``n`` short prompts (8 distinct, repeated), the only column GRPO and RLOO need."""
    words = ["hello world", "abc def", "the cat sat", "zz top", "q: ab", "red fox", "x", "go"]
    return Dataset.from_dict({"prompt": [words[i % len(words)] for i in range(n)]})


def reward(completions: list[str], **_) -> list[float]:
    """A fixed reward that prefers letters other than 'a' and some length."""
    return [len(text) / COMPLETION_TOKENS - 0.5 * text.count("a") for text in completions]


def saved_tiny_model(directory: Path) -> str:
    """The tiny policy and tokenizer on disk: with beta > 0 the trainers build the
    reference from the policy's path."""
    tiny_model().save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return str(directory)


def make_rl(
    trainer_cls,
    config_cls,
    output_dir: Path,
    *,
    model=None,
    dataset=None,
    peft_config=None,
    **overrides,
):
    """A GRPO or RLOO trainer on the tiny policy (or a path) and the prompts."""
    fields = config_kwargs(output_dir, **{**RL_FIELDS, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_cls(
            model=tiny_model() if model is None else model,
            reward_funcs=reward,
            args=config_cls(**fields),
            train_dataset=prompt_dataset() if dataset is None else dataset,
            processing_class=tokenizer(),
            peft_config=peft_config,
        )
