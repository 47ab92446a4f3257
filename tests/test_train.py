"""The reference trainer: data layout, the step's loss, learning, checkpoints, the CLI.

Everything runs the embedded tiny Llama on CPU, with few steps; runs are seeded, and
CPU float arithmetic is deterministic, so the assertions on learning are stable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    PreTrainedTokenizerFast,
)

from lenalign import reference_sequence_logprobs
from lenalign.cli import main as cli_main
from lenalign.losses import preference_loss
from lenalign.synthetic import (
    case_task_answer,
    case_task_score,
    make_case_pairs,
)
from lenalign.tiny import build_byte_tokenizer, build_tiny_llama
from lenalign.train import (
    Generation,
    HeadInput,
    TrainConfig,
    batch_loss,
    build_parser,
    config_from_args,
    forward_head_input,
    forward_logits,
    fused_head_transform,
    generate_greedy,
    generation_metrics,
    loss_options,
    main,
    micro_batch_indices,
    split_pairs,
    train,
)
from lenalign.train_data import (
    PreferencePair,
    SpecialTokens,
    collate_pairs,
    load_preference_jsonl,
    special_tokens,
    tokenize_pair,
    tokenize_pairs,
    write_preference_jsonl,
)

REPO = Path(__file__).resolve().parents[1]


def small_config(tmp_path: Path, **overrides) -> TrainConfig:
    """A run of a few seconds: few pairs, small batches, a short greedy generation."""
    values = {
        "output_dir": str(tmp_path / "run"),
        "synthetic_size": 512,
        "eval_size": 64,
        "batch_size": 8,
        "max_steps": 6,
        "warmup_steps": 2,
        "logging_steps": 1,
        "eval_steps": 0,
        "generate_size": 4,
        "max_new_tokens": 6,
        "progress": False,
    }
    return TrainConfig(**{**values, **overrides})


# ----------------------------------------------------------------------------- data layout


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def byte_ids(text: str) -> list[int]:
    """The byte tokenizer's ids, written out independently of it: byte b is id b + 3."""
    return [b + 3 for b in text.encode("utf-8")]


def test_tokenize_pair_masks_prompt_and_appends_eos(tokenizer):
    row = tokenize_pair(PreferencePair("ab", "CD", "e"), tokenizer, 64, 32)
    eos = tokenizer.eos_token_id
    assert row.chosen_ids == byte_ids("ab") + byte_ids("CD") + [eos]
    assert row.rejected_ids == byte_ids("ab") + byte_ids("e") + [eos]
    assert row.prompt_length == 2


def test_truncation_keeps_the_prompts_end_then_cuts_completions(tokenizer):
    eos = tokenizer.eos_token_id
    # 10-byte prompt + 5-token completion fit in 12 only by dropping the prompt's start
    row = tokenize_pair(PreferencePair("0123456789", "abcd", "xy"), tokenizer, 12, 4)
    assert row.chosen_ids == [*byte_ids("3456789"), *byte_ids("abcd"), eos]
    assert row.rejected_ids == [*byte_ids("3456789"), *byte_ids("xy"), eos]
    # the prompt never goes below max_prompt_length: the completion's end goes instead
    row = tokenize_pair(PreferencePair("0123456789", "abcdefghij", "xy"), tokenizer, 12, 4)
    assert row.chosen_ids == byte_ids("6789") + byte_ids("abcdefgh")
    assert row.rejected_ids == byte_ids("6789") + byte_ids("xy") + [eos]


@pytest.fixture(scope="module")
def word_tokenizer():
    """A Llama-like tokenizer built in code: a BOS and an EOS, no padding token."""
    words = ["<s>", "</s>", "<unk>", "upper", "lower", ":", "a", "b", "c", "A", "B", "C"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_truncation_keeps_the_bos_and_pads_with_eos(word_tokenizer):
    bos, eos = word_tokenizer.bos_token_id, word_tokenizer.eos_token_id
    assert special_tokens(word_tokenizer) == SpecialTokens(bos=bos, eos=eos, pad=eos)
    row = tokenize_pair(PreferencePair("upper : a b c", "A B", "a"), word_tokenizer, 5, 2)
    c, big_a, big_b, a = (word_tokenizer.convert_tokens_to_ids(t) for t in ("c", "A", "B", "a"))
    assert row.chosen_ids == [bos, c, big_a, big_b, eos]
    assert row.rejected_ids == [bos, c, a, eos]
    assert row.prompt_length == 2


def test_collate_puts_chosen_rows_first_right_padded(tokenizer):
    pairs = [PreferencePair("p", "aaa", "b"), PreferencePair("qq", "c", "dddd")]
    rows = tokenize_pairs(pairs, tokenizer, 64, 32)
    batch = collate_pairs(rows, pad_token_id=0)
    expected_rows = [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows]
    assert batch["input_ids"].shape == (4, 7)
    for i, ids in enumerate(expected_rows):
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["input_ids"][i, len(ids) :].eq(0).all()
        assert batch["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (7 - len(ids))
    # completion tokens only: prompt and padding are never scored
    assert batch["completion_mask"][0].tolist() == [False, True, True, True, True, False, False]
    assert batch["completion_mask"][3].tolist() == [False, False, True, True, True, True, True]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "chosen": "c"}', "row 3: missing field 'rejected'"),
        ('{"prompt": "p", "chosen": 5, "rejected": "r"}', "row 3: field 'chosen' must be a string"),
        ('{"prompt": "p", "chosen": "c", "rejected": ""}', "row 3: field 'rejected' is an empty"),
        ('{"prompt": null, "chosen": "c", "rejected": "r"}', "row 3: field 'prompt' must be a"),
        ('["p", "c", "r"]', "row 3: expected a JSON object"),
        ('{"prompt": "p",', "row 3: not valid JSON"),
    ],
)
def test_bad_jsonl_row_names_row_and_field(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    good = '{"prompt": "p", "chosen": "c", "rejected": "r", "extra": 1}'
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=message):
        load_preference_jsonl(path)


def test_jsonl_round_trip(tmp_path):
    pairs = [*make_case_pairs(5, seed=3), PreferencePair("", "é\n", '"x"')]
    write_preference_jsonl(pairs, tmp_path / "pairs.jsonl")
    assert load_preference_jsonl(tmp_path / "pairs.jsonl") == pairs


# ----------------------------------------------------------------------------- synthetic task


def test_case_task_pairs_are_seeded_and_follow_the_rule():
    pairs = make_case_pairs(200, seed=7)
    assert pairs == make_case_pairs(200, seed=7)
    assert pairs[:50] == make_case_pairs(50, seed=7)
    assert pairs != make_case_pairs(200, seed=8)
    instructions = {p.prompt.split(":")[0] for p in pairs}
    assert instructions == {"upper", "lower"}
    for p in pairs:
        assert p.chosen == case_task_answer(p.prompt)
        assert p.rejected.swapcase() == p.chosen
        assert case_task_score(p.prompt, p.chosen) == 1.0
        assert case_task_score(p.prompt, p.rejected) == 0.0


def test_case_task_score_counts_positions():
    assert case_task_score("upper: abcd\n", "ABxD") == 0.75
    assert case_task_score("lower: AB\n", "abcd") == 0.5
    with pytest.raises(ValueError, match="prompt"):
        case_task_score("shout: ab\n", "AB")


def test_micro_batches_cover_each_epoch_once():
    batches = [micro_batch_indices(10, 4, seed=1, number=k) for k in range(5)]
    stream = [i for batch in batches for i in batch]
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    assert batches == [micro_batch_indices(10, 4, seed=1, number=k) for k in range(5)]


# ----------------------------------------------------------------------------- the step's loss


@pytest.mark.parametrize(
    ("loss_type", "length_normalization", "extra"),
    [
        ("sigmoid", "sum", {}),
        ("ipo", "mean", {}),
        ("sigmoid", 0.5, {"label_smoothing": 0.1, "sft_weight": 0.3}),
        ("simpo", "mean", {"gamma": 0.5}),
    ],
)
def test_batch_loss_equals_eager_reference(
    tmp_path, tokenizer, loss_type, length_normalization, extra
):
    config = small_config(
        tmp_path,
        loss_type=loss_type,
        length_normalization=length_normalization,
        beta=0.7,
        **extra,
    )
    policy = build_tiny_llama(tokenizer, seed=1)
    rows = tokenize_pairs(make_case_pairs(6, seed=2), tokenizer, 64, 32)
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    reference = None
    if loss_type != "simpo":
        # a reference unlike the policy, so that the log-ratios are not all zero
        with torch.no_grad():
            ref_logits = forward_logits(build_tiny_llama(tokenizer, seed=2), batch)
        reference = split_pairs(
            reference_sequence_logprobs(
                ref_logits, batch["input_ids"], batch["completion_mask"], shift=True
            )
        )

    logits = forward_logits(policy, batch)
    fused = batch_loss(logits, batch, reference, config)
    eager_logps = reference_sequence_logprobs(
        logits, batch["input_ids"], batch["completion_mask"], shift=True
    )
    eager = preference_loss(
        *split_pairs(eager_logps), *(reference or (None, None)), **loss_options(config)
    )

    torch.testing.assert_close(fused.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.margins, eager.margins, rtol=1e-5, atol=1e-6)
    assert torch.equal(fused.chosen_lengths, eager.chosen_lengths)
    fused_grad = torch.autograd.grad(fused.loss, logits, retain_graph=True)[0]
    eager_grad = torch.autograd.grad(eager.loss, logits)[0]
    torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-4, atol=1e-7)


def test_fused_head_loss_and_gradients_equal_the_logits_path(tmp_path, tokenizer):
    config = small_config(tmp_path, length_normalization="mean", beta=0.7)
    rows = tokenize_pairs(make_case_pairs(6, seed=3), tokenizer, 64, 32)
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        ref_logits = forward_logits(build_tiny_llama(tokenizer, seed=2), batch)
    reference = split_pairs(
        reference_sequence_logprobs(
            ref_logits, batch["input_ids"], batch["completion_mask"], shift=True
        )
    )
    results = []
    for fused in (False, True):
        policy = build_tiny_llama(tokenizer, seed=1)
        outputs = forward_head_input(policy, batch) if fused else forward_logits(policy, batch)
        out = batch_loss(outputs, batch, reference, config)
        out.loss.backward()
        grads = {name: p.grad for name, p in policy.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (loss, grads), (fused_loss, fused_grads) = results
    assert loss.abs() > 1e-3
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    # the tiny model ties its head to the embeddings: one parameter, both gradients in it
    assert fused_grads.keys() == grads.keys() and "model.embed_tokens.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_head_trains_like_the_logits_path(tmp_path):
    plain = train(small_config(tmp_path / "a", max_steps=3, generate_size=0))
    fused = train(small_config(tmp_path / "b", max_steps=3, generate_size=0, fused_head=True))
    for a, b in zip(plain.train_log, fused.train_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert fused.eval_log[0]["loss"] == pytest.approx(plain.eval_log[0]["loss"], rel=1e-4)


def tiny_head_model(kind: str, vocab: int, seed: int):
    """A one-layer Gemma 2 (soft-capped logits) or Cohere (scaled logits) built in code,
    with a head large enough that the cap and the scale change the log-likelihoods."""
    torch.manual_seed(seed)
    sizes = {"vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32}
    sizes |= {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    if kind == "gemma2":
        config = Gemma2Config(**sizes, head_dim=8, final_logit_softcapping=3.0)
        model = Gemma2ForCausalLM(config)
    else:
        model = CohereForCausalLM(CohereConfig(**sizes, logit_scale=0.25))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(200.0)
    return model.double()


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_fused_head_reproduces_scaled_and_capped_logits(tmp_path, tokenizer, kind):
    config = small_config(tmp_path, loss_type="simpo", length_normalization="mean", beta=2.0)
    rows = tokenize_pairs(make_case_pairs(4, seed=5), tokenizer, 48, 24)
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    results = []
    for fused in (False, True):
        model = tiny_head_model(kind, len(tokenizer), seed=3)
        outputs = forward_head_input(model, batch) if fused else forward_logits(model, batch)
        out = batch_loss(outputs, batch, None, config)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads, outputs))
    (loss, grads, _), (fused_loss, fused_grads, head_input) = results
    # the transform matters here: without it the loss would differ
    assert head_input.transform != {"logit_scale": 1.0, "logit_softcap": None}
    plain = batch_loss(
        HeadInput(head_input.hidden, head_input.weight, head_input.bias, {}), batch, None, config
    )
    assert abs(float(plain.loss.detach()) - float(loss)) > 1e-3
    torch.testing.assert_close(fused_loss, loss, rtol=1e-10, atol=1e-12)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-8, atol=1e-12, msg=name)


def test_fused_head_refuses_a_transform_it_cannot_form(tokenizer):
    model = build_tiny_llama(tokenizer, seed=0)
    assert fused_head_transform(model) == {"logit_scale": 1.0, "logit_softcap": None}
    model.config.logits_scaling = 8.0
    with pytest.raises(ValueError, match=r"^fused_head: expected .*logits_scaling=8.0"):
        fused_head_transform(model)


def test_trainer_first_step_logs_the_independently_computed_loss(tmp_path, tokenizer):
    config = small_config(tmp_path, max_steps=1, eval_size=0)
    result = train(config)

    pairs = make_case_pairs(config.synthetic_size, config.seed)
    indices = micro_batch_indices(len(pairs), config.batch_size, config.seed, number=0)
    rows = tokenize_pairs(
        [pairs[i] for i in indices], tokenizer, config.max_length, config.max_prompt_length
    )
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    policy = build_tiny_llama(tokenizer, config.seed)
    reference = build_tiny_llama(tokenizer, config.seed)
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels, mask = batch["input_ids"], batch["completion_mask"]
    policy_logps = reference_sequence_logprobs(logits.logits, labels, mask, shift=True)
    ref_logps = reference_sequence_logprobs(ref_logits.logits, labels, mask, shift=True)
    expected = preference_loss(*split_pairs(policy_logps), *split_pairs(ref_logps), beta=0.1)

    (record,) = result.train_log
    assert record["loss"] == pytest.approx(float(expected.loss), rel=1e-5)
    assert record["chosen_length"] == pytest.approx(float(expected.chosen_lengths.float().mean()))


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize(("length_normalization", "beta"), [("sum", 0.1), ("mean", 1.0)])
def test_training_lowers_loss_and_lifts_heldout_accuracy(tmp_path, length_normalization, beta):
    # the embedded defaults (model, tokenizer, data, optimizer), cut to 30 steps
    config = TrainConfig(
        max_steps=30,
        output_dir=str(tmp_path / "run"),
        progress=False,
        length_normalization=length_normalization,
        beta=beta,
    )
    result = train(config)

    losses = [record["loss"] for record in result.train_log]
    assert losses[-1] < 0.8 * losses[0]
    (final,) = result.eval_log
    # DPO's loss starts at log 2, where the policy is its own reference
    assert final["loss"] < 0.6
    assert final["accuracy"] >= 0.8
    assert final["margin"] > 0
    assert 1 <= final["gen_length"] <= config.max_new_tokens
    assert 0 <= final["task_score"] <= 1
    logged = [
        json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    ]
    assert logged == result.train_log + result.eval_log
    for name in ("chosen_reward", "rejected_reward", "chosen_length", "learning_rate"):
        assert name in logged[0]
    assert logged[0]["tokens_per_second"] > 0


def test_precomputed_reference_trains_like_a_reference_model(tmp_path):
    with_model = train(small_config(tmp_path / "a", max_steps=3, generate_size=0))
    precomputed = train(
        small_config(tmp_path / "b", max_steps=3, generate_size=0, precompute_ref=True)
    )
    for a, b in zip(with_model.train_log, precomputed.train_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert precomputed.eval_log[0]["accuracy"] == pytest.approx(with_model.eval_log[0]["accuracy"])


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


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    result = train(small_config(tmp_path, max_steps=2))
    checkpoint = result.checkpoint
    assert checkpoint == tmp_path / "run/checkpoint-2"

    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    ids = tokenizer("upper: abc\n", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [*byte_ids("upper: abc\n"), tokenizer.eos_token_id]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, result.model(ids).logits, rtol=0, atol=0)
    saved = json.loads((checkpoint / "train_config.json").read_text())
    assert saved["max_steps"] == 2
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert state["optimizer"]["state"]


def test_resume_continues_the_same_run(tmp_path):
    straight = train(small_config(tmp_path / "straight", save_steps=3))
    resumed_dir = tmp_path / "resumed/run"
    resumed_dir.mkdir(parents=True)
    # the state of a run that stopped after its step-3 checkpoint
    shutil.copytree(tmp_path / "straight/run/checkpoint-3", resumed_dir / "checkpoint-3")
    metrics = (tmp_path / "straight/run/metrics.jsonl").read_text().splitlines()
    (resumed_dir / "metrics.jsonl").write_text("\n".join(metrics) + "\n")

    resumed = train(small_config(tmp_path / "resumed", save_steps=3, resume="latest"))

    assert resumed.step == straight.step == 6
    for name, parameter in straight.model.state_dict().items():
        assert torch.equal(parameter, resumed.model.state_dict()[name]), name

    def comparable(log):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in log]

    assert [r["step"] for r in resumed.train_log] == [1, 2, 3, 4, 5, 6]
    assert comparable(resumed.train_log) == comparable(straight.train_log)
    assert resumed.eval_log == straight.eval_log


def test_resume_rejects_a_directory_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"resume: .* is not a checkpoint"):
        train(small_config(tmp_path, resume=str(tmp_path)))


# ----------------------------------------------------------------------------- configuration


def test_every_field_has_a_flag_and_documentation():
    usage = build_parser().format_help()
    docs = (REPO / "docs/trainer.md").read_text()
    for option in fields(TrainConfig):
        assert "--" + option.name.replace("_", "-") in usage
        assert f"`{option.name}`" in docs, f"docs/trainer.md does not document {option.name}"


def test_flags_override_config_file(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; a float field takes it as the number
    (tmp_path / "c.yaml").write_text(
        "max_steps: 7\nlength_normalization: 0.5\nbeta: 2\nlearning_rate: 1e-4\n"
    )
    config = config_from_args(["--config", str(tmp_path / "c.yaml"), "--max-steps", "9"])
    assert (config.max_steps, config.length_normalization, config.beta) == (9, 0.5, 2.0)
    assert config.learning_rate == 1e-4
    (tmp_path / "c.json").write_text('{"length_normalization": "mean", "precompute_ref": true}')
    config = config_from_args(["--config", str(tmp_path / "c.json"), "--no-precompute-ref"])
    assert (config.length_normalization, config.precompute_ref) == ("mean", False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_steps": 0}, "max_steps: expected an integer >= 1"),
        ({"max_steps": 2.5}, "max_steps: expected an integer"),
        ({"batch_size": True}, "batch_size: expected an integer"),
        ({"length_normalization": "median"}, "length_normalization"),
        ({"length_normalization": 1.5}, "length_normalization"),
        ({"loss_type": "kto"}, "loss_type"),
        ({"beta": 0}, "beta"),
        ({"gamma": 0.5}, "gamma"),
        ({"loss_type": "simpo", "precompute_ref": True}, "precompute_ref"),
        ({"max_prompt_length": 512}, "max_prompt_length"),
        ({"precision": "fp8"}, "precision"),
        ({"tokenizer": "somewhere"}, "tokenizer: only with model"),
    ],
)
def test_bad_config_values_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_bad_flag_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        config_from_args(["--length-normalization", "median"])
    assert "expected 'sum', 'mean' or a number in [0, 1], got 'median'" in capsys.readouterr().err


def test_config_file_with_unknown_field(tmp_path):
    (tmp_path / "c.json").write_text('{"max_steps": 3, "epochs": 2}')
    with pytest.raises(ValueError, match="unknown fields epochs"):
        TrainConfig.from_file(tmp_path / "c.json")


def test_trains_a_local_model_whose_tokenizer_has_bos_and_no_pad(tmp_path, word_tokenizer):
    model_dir = tmp_path / "model"
    build_tiny_llama(word_tokenizer, seed=5).save_pretrained(model_dir)
    word_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    pairs = [PreferencePair(f"upper : {w}", w.upper(), w) for w in ("a b", "c", "b c a")] * 4
    write_preference_jsonl(pairs, data)
    config = small_config(tmp_path, model=str(model_dir), train_file=str(data), eval_size=3)
    result = train(config)
    assert result.step == 6
    # loaded back from the directory, with its BOS and without a padding token
    assert result.tokenizer.bos_token_id == word_tokenizer.bos_token_id
    assert result.tokenizer.pad_token_id is None
    assert 1 <= result.eval_log[0]["gen_length"] <= config.max_new_tokens


def test_model_path_must_be_a_local_directory(tmp_path):
    with pytest.raises(ValueError, match=r"model: .* is not a local directory"):
        train(small_config(tmp_path, model="some-org/some-model"))


def test_trains_a_model_loaded_from_a_local_directory(tmp_path, tokenizer):
    model_dir = tmp_path / "model"
    build_tiny_llama(tokenizer, seed=5).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    write_preference_jsonl(make_case_pairs(40, seed=9), data)
    result = train(small_config(tmp_path, model=str(model_dir), train_file=str(data), eval_size=8))
    assert result.step == 6
    assert len(result.eval_log) == 1


# ----------------------------------------------------------------------------- command line


def test_cli_with_defaults_runs_end_to_end(tmp_path, capsys):
    output_dir = tmp_path / "run"
    code = cli_main(["train", "--max-steps", "3", "--output-dir", str(output_dir)])
    assert code == 0
    out = capsys.readouterr().out
    assert "embedded tiny Llama" in out
    assert "done: 3 steps" in out
    assert "eval   loss" in out
    assert (output_dir / "checkpoint-3/config.json").is_file()
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["split"] for line in lines] == ["train", "eval"]


def test_cli_reports_a_bad_row(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p"}\n')
    code = main(["--train-file", str(data), "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert f"{data}: row 2: missing field 'chosen'" in capsys.readouterr().err


def test_console_command_runs_offline(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"max_steps: 2\neval_size: 8\ngenerate_size: 2\noutput_dir: {tmp_path}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "lenalign.cli", "train", "--config", str(config), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "done: 2 steps" in completed.stdout
