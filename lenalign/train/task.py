"""The embedded preference task: write a word in the letter case the prompt asks for.

A prompt reads ``"upper: qWeRt\\n"`` or ``"lower: qWeRt\\n"``, the word being random
ASCII letters in random case. ``chosen`` is the word in the requested case (``"QWERT"``
for "upper"), ``rejected`` the same word in the other case. The two completions differ
in letter case only, and which one is right is decided by the prompt's first word alone:
a model ranks chosen above rejected on unseen prompts only if it learned to condition
its completion on the instruction, and the random letters offer no shortcut. The right
answer is known for every prompt, so a generated completion gets a programmatic score
(``case_task_score``), not only a preference.
"""

from __future__ import annotations

import random
import string

from ..checks import check_choice, check_int, fail
from .data import PreferencePair

INSTRUCTIONS = ("upper", "lower")
MIN_WORD_LENGTH = 3
MAX_WORD_LENGTH = 8


def case_task_prompt(instruction: str, word: str) -> str:
    """The prompt that asks for ``word`` in the case named by ``instruction``."""
    check_choice("instruction", instruction, INSTRUCTIONS)
    return f"{instruction}: {word}\n"


def case_task_answer(prompt: str) -> str:
    """The correct completion of a case-task prompt."""
    instruction, separator, rest = prompt.partition(": ")
    if instruction not in INSTRUCTIONS or not separator or not rest.endswith("\n"):
        raise ValueError(f"prompt: not a case-task prompt: {prompt!r}")
    word = rest[:-1]
    return word.upper() if instruction == "upper" else word.lower()


def case_task_score(prompt: str, completion: str) -> float:
    """Fraction of the answer's characters that the completion has right, in [0, 1].

    Position by position, over the longer of the two strings, so that missing and
    extra characters both cost: 1.0 only for the exact answer.
    """
    answer = case_task_answer(prompt)
    longest = max(len(answer), len(completion))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(answer, completion, strict=False)) / longest


def make_case_pairs(
    n: int,
    seed: int,
    *,
    min_word_length: int = MIN_WORD_LENGTH,
    max_word_length: int = MAX_WORD_LENGTH,
) -> list[PreferencePair]:
    """``n`` case-task preference pairs drawn from ``seed``; the same arguments, the same pairs.

    Each pair draws the instruction uniformly, a word length uniformly in
    [``min_word_length``, ``max_word_length``] and each letter uniformly from the 52 ASCII
    letters. A longer list from the same seed starts with the shorter one, so held-out
    pairs can be taken from the end of one draw.
    """
    check_int("n", n, minimum=0)
    if not 1 <= min_word_length <= max_word_length:
        got = f"{min_word_length}, {max_word_length}"
        fail("min_word_length, max_word_length", "1 <= min <= max", got)
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        instruction = rng.choice(INSTRUCTIONS)
        length = rng.randint(min_word_length, max_word_length)
        word = "".join(rng.choice(string.ascii_letters) for _ in range(length))
        prompt = case_task_prompt(instruction, word)
        upper, lower = word.upper(), word.lower()
        chosen, rejected = (upper, lower) if instruction == "upper" else (lower, upper)
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs
