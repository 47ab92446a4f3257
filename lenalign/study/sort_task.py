"""The length study's task: sort a short list of digits, with length-biased preferences.

A prompt reads ``"sort: 4913\\n"`` (3 to 6 random digits, repeats allowed) and the right
completion is the digits in ascending order, ``"1349"``. A program knows the answer of
every prompt, so a generated completion gets a score (``sort_score``) without any
judge model.

Each preference pair prefers the right answer over a wrong one of the same length (two
unequal digits swapped, or one digit replaced). The length bias is added on the chosen
side only: most chosen completions are followed by filler characters (``"1349....."``),
so that chosen completions are longer than rejected ones by ``length_bias`` tokens on
average. Correctness and length then both separate chosen from rejected in the data, and
a policy can raise its preference margins either by being right or by writing filler.
The byte tokenizer makes one character one token, so lengths in characters are lengths
in tokens.
"""

from __future__ import annotations

import math
import random

from ..checks import check_int, fail, finite_real
from ..train import PreferencePair

PROMPT_PREFIX = "sort: "
FILLER = "."
DIGITS = "0123456789"
MIN_DIGITS = 3
MAX_DIGITS = 6
# share of the chosen completions that carry filler: most, not all, so that the data
# still holds plain pairs where only correctness tells chosen from rejected
FILLER_SHARE = 0.75


def sort_prompt(digits: str) -> str:
    """The prompt that asks to sort ``digits`` (a non-empty string of decimal digits)."""
    if not digits or any(c not in DIGITS for c in digits):
        raise ValueError(f"digits: expected a non-empty string of decimal digits, got {digits!r}")
    return f"{PROMPT_PREFIX}{digits}\n"


def sort_answer(prompt: str) -> str:
    """The correct completion of a sort prompt: its digits in ascending order."""
    digits = prompt.removeprefix(PROMPT_PREFIX).removesuffix("\n")
    if prompt != f"{PROMPT_PREFIX}{digits}\n" or not digits or any(c not in DIGITS for c in digits):
        raise ValueError(f"prompt: not a sort prompt: {prompt!r}")
    return "".join(sorted(digits))


def sort_score(prompt: str, completion: str) -> float:
    """Fraction of positions where the completion has the answer's character, in [0, 1].

    Counted over the longer of answer and completion, so that a missing digit and an
    extra character (filler included) both cost: only the exact answer scores 1.
    """
    answer = sort_answer(prompt)
    longest = max(len(answer), len(completion))
    return sum(a == b for a, b in zip(answer, completion, strict=False)) / longest


def strip_filler(completion: str) -> str:
    """The completion without its trailing filler: what it answers, however long it is."""
    return completion.rstrip(FILLER)


def corrupt(answer: str, rng: random.Random) -> str:
    """A wrong completion of the answer's length: two unequal digits swapped (order broken),
    or, when all digits are equal or with probability 1/2, one digit replaced (set broken)."""
    chars = list(answer)
    positions = range(len(chars))
    if len(set(chars)) > 1 and rng.random() < 0.5:
        i = rng.choice(positions)
        j = rng.choice([k for k in positions if chars[k] != chars[i]])
        chars[i], chars[j] = chars[j], chars[i]
    else:
        i = rng.choice(positions)
        chars[i] = rng.choice([d for d in DIGITS if d != chars[i]])
    return "".join(chars)


def filler_length(length_bias: float, rng: random.Random) -> int:
    """Filler characters after one chosen completion: 0 with probability 1 - FILLER_SHARE,
    else ``length_bias / FILLER_SHARE`` rounded up or down at random, so that the mean
    over pairs is ``length_bias``.

    It draws twice from ``rng`` whatever happens, so that with one seed the same pairs
    carry filler at every ``length_bias``.
    """
    filled, rounding = rng.random() < FILLER_SHARE, rng.random()
    if not filled:
        return 0
    per_filled = length_bias / FILLER_SHARE
    whole = math.floor(per_filled)
    return whole + (rounding < per_filled - whole)


def make_sort_pairs(n: int, seed: int, *, length_bias: float) -> list[PreferencePair]:
    """``n`` length-biased sort pairs drawn from ``seed``; the same arguments, the same pairs.

    Each pair draws 3 to 6 digits uniformly (repeats allowed), prefers the sorted digits,
    followed by ``filler_length`` filler characters, over a ``corrupt``-ed answer. The
    chosen completions are longer than the rejected ones by ``length_bias`` characters
    (= tokens of the byte tokenizer) in expectation. A longer list from the same seed
    starts with the shorter one, and the prompts and rejected completions are the same
    at every ``length_bias``.

    Raises:
        ValueError: for a negative ``n`` or a ``length_bias`` that is negative or not finite.
    """
    check_int("n", n, minimum=0)
    if finite_real("length_bias", length_bias) < 0:
        fail("length_bias", "a finite number >= 0", length_bias)
    rng = random.Random(seed)
    # a stream of its own, so that prompts and rejected completions do not depend on the bias
    filler_rng = random.Random(f"filler {seed}")
    pairs = []
    for _ in range(n):
        digits = "".join(rng.choice(DIGITS) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS)))
        prompt = sort_prompt(digits)
        answer = sort_answer(prompt)
        rejected = corrupt(answer, rng)
        chosen = answer + FILLER * filler_length(length_bias, filler_rng)
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs
