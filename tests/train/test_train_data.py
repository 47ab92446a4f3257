"""The trainer's data: the pair layout, JSONL files, the embedded case task, batch order."""

from __future__ import annotations

import pytest
from train_helpers import byte_ids

from lenalign.train import (
    PreferencePair,
    SpecialTokens,
    case_task_answer,
    case_task_score,
    collate_pairs,
    load_preference_jsonl,
    make_case_pairs,
    micro_batch_indices,
    special_tokens,
    tokenize_pair,
    tokenize_pairs,
    write_preference_jsonl,
)

# ----------------------------------------------------------------------------- data layout


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


# ----------------------------------------------------------------------------- the case task


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


# ----------------------------------------------------------------------------- batch order


def test_micro_batches_cover_each_epoch_once():
    batches = [micro_batch_indices(10, 4, seed=1, number=k) for k in range(5)]
    stream = [i for batch in batches for i in batch]
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    assert batches == [micro_batch_indices(10, 4, seed=1, number=k) for k in range(5)]
