"""The length study's sort task: prompts, answers, the scorer and the length-biased pairs."""

from __future__ import annotations

import math
import random

import pytest

from lenalign.study.sort_task import (
    FILLER,
    FILLER_SHARE,
    MAX_DIGITS,
    MIN_DIGITS,
    corrupt,
    make_sort_pairs,
    sort_answer,
    sort_prompt,
    sort_score,
    strip_filler,
)


def test_prompt_and_answer():
    assert sort_prompt("4913") == "sort: 4913\n"
    assert sort_answer("sort: 4913\n") == "1349"
    assert sort_answer(sort_prompt("5050")) == "0055"


@pytest.mark.parametrize("digits", ["", "12a", "1 2", "١٢"])
def test_prompt_refuses_non_digits(digits):
    with pytest.raises(ValueError, match=r"^digits:"):
        sort_prompt(digits)


@pytest.mark.parametrize("prompt", ["sort: 4913", "sort 4913\n", "sort: \n", "sort: 49x\n", ""])
def test_answer_refuses_other_prompts(prompt):
    with pytest.raises(ValueError, match=r"^prompt:"):
        sort_answer(prompt)


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("1349", 1.0),
        ("1394", 0.5),  # two positions wrong
        ("134", 0.75),  # a missing digit costs its position
        ("1349..", 4 / 6),  # extra characters, filler included, cost too
        ("", 0.0),
        ("9431", 0.0),
    ],
)
def test_score_counts_positions_over_the_longer_string(completion, score):
    assert sort_score("sort: 4913\n", completion) == pytest.approx(score)


def test_strip_filler_keeps_the_answer_part():
    assert strip_filler("1349....") == "1349"
    assert strip_filler("1349") == "1349"
    assert strip_filler("....") == ""


def test_corrupt_gives_a_wrong_answer_of_the_same_length():
    rng = random.Random(0)
    for answer in ["0123", "555", "0000009", "12"]:
        for _ in range(50):
            wrong = corrupt(answer, rng)
            assert len(wrong) == len(answer) and wrong != answer
            assert set(wrong) <= set("0123456789")


def test_pairs_are_seeded_and_prefix_stable():
    first = make_sort_pairs(200, 7, length_bias=4.0)
    assert first == make_sort_pairs(200, 7, length_bias=4.0)
    assert first[:50] == make_sort_pairs(50, 7, length_bias=4.0)
    assert first != make_sort_pairs(200, 8, length_bias=4.0)


def test_pairs_prefer_the_answer_with_filler_over_a_wrong_answer():
    for pair in make_sort_pairs(500, 1, length_bias=3.0):
        answer = sort_answer(pair.prompt)
        assert MIN_DIGITS <= len(answer) <= MAX_DIGITS
        assert strip_filler(pair.chosen) == answer
        assert sort_score(pair.prompt, strip_filler(pair.chosen)) == 1.0
        assert len(pair.rejected) == len(answer) and pair.rejected != answer


@pytest.mark.parametrize("bias", [0.5, 2.0, 4.0, 7.3])
def test_measured_length_bias_is_the_requested_one(bias):
    pairs = make_sort_pairs(4000, 3, length_bias=bias)
    measured = sum(len(p.chosen) - len(p.rejected) for p in pairs) / len(pairs)
    # the standard error of the mean is below 0.1 for these biases and 4000 pairs
    assert measured == pytest.approx(bias, abs=0.25)


def test_most_chosen_completions_carry_filler():
    pairs = make_sort_pairs(4000, 3, length_bias=4.0)
    filled = [p for p in pairs if p.chosen.endswith(FILLER)]
    assert len(filled) / len(pairs) == pytest.approx(FILLER_SHARE, abs=0.03)
    # 4 / 0.75 = 5.33 filler characters per filled completion: 5 or 6 of them
    assert {len(p.chosen) - len(strip_filler(p.chosen)) for p in filled} == {5, 6}


def test_length_bias_changes_the_filler_only():
    plain = make_sort_pairs(300, 5, length_bias=0.0)
    biased = make_sort_pairs(300, 5, length_bias=6.0)
    assert all(len(p.chosen) == len(p.rejected) for p in plain)
    for a, b in zip(plain, biased, strict=True):
        assert (a.prompt, a.rejected) == (b.prompt, b.rejected)
        assert strip_filler(b.chosen) == a.chosen


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n": -1, "length_bias": 1.0}, "n"),
        ({"n": 2.0, "length_bias": 1.0}, "n"),
        ({"n": 5, "length_bias": -0.5}, "length_bias"),
        ({"n": 5, "length_bias": math.nan}, "length_bias"),
        ({"n": 5, "length_bias": math.inf}, "length_bias"),
        ({"n": 5, "length_bias": True}, "length_bias"),
        ({"n": 5, "length_bias": "4"}, "length_bias"),
    ],
)
def test_pair_generator_refuses_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        make_sort_pairs(seed=0, **kwargs)
