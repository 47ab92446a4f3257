"""Evaluation: greedy generation against a plain greedy loop, and generation metrics."""

from __future__ import annotations

import torch
from train_helpers import byte_ids

from lenalign.train import (
    Generation,
    build_tiny_llama,
    case_task_score,
    generate_greedy,
    generation_metrics,
)


def test_greedy_generation_matches_a_plain_greedy_loop(tokenizer):
    model = build_tiny_llama(tokenizer, seed=0)
    with torch.no_grad():
        # sharpen the random model's logits, so that no greedy choice is a near tie that
        # padding could flip
        model.get_input_embeddings().weight.mul_(50)
    eos_bias = torch.zeros(len(tokenizer))
    model.lm_head.register_forward_hook(lambda module, args, output: output + eos_bias)
    prompts = ["upper: ab\n", "lower: Wxyz\n", "x"]

    def generate() -> list[Generation]:
        # batches of 2 make the first batch left-padded
        return generate_greedy(
            model, tokenizer, prompts, max_new_tokens=5, max_prompt_length=32, batch_size=2
        )

    eos_bias[tokenizer.eos_token_id] = -1e4
    for g, prompt in zip(generate(), prompts, strict=True):
        ids = torch.tensor([byte_ids(prompt)])
        with torch.no_grad():
            for _ in range(5):
                next_id = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        expected = tokenizer.decode(ids[0, -5:], skip_special_tokens=True)
        assert (g.prompt, g.text, g.num_tokens, g.finished) == (prompt, expected, 5, False)

    eos_bias[tokenizer.eos_token_id] = 1e4
    assert [(g.text, g.num_tokens, g.finished) for g in generate()] == [("", 1, True)] * 3


def test_generation_metrics():
    generations = [
        Generation("upper: ab\n", "AB", 3, True),
        Generation("lower: CD\n", "cdxx", 5, False),
    ]
    metrics = generation_metrics(generations, case_task_score)
    assert metrics == {"gen_length": 4.0, "gen_finished": 0.5, "task_score": 0.75}
    assert "task_score" not in generation_metrics(generations)
