"""Whole runs: learning, the precomputed reference, models loaded from local directories."""

from __future__ import annotations

import json

import pytest
from train_helpers import small_config

from lenalign.train import (
    PreferencePair,
    TrainConfig,
    build_tiny_llama,
    make_case_pairs,
    train,
    write_preference_jsonl,
)


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
