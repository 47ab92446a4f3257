"""``LenalignSFTConfig``: TRL's SFTConfig plus how the SFT loss weighs sequences.

Every SFTConfig field keeps its meaning. One field is added, ``length_normalization``:

- ``"token"`` (the default): SFTTrainer's loss, the token mean over the batch,
  sum of token NLLs / ``num_items_in_batch`` (the scored tokens of the whole
  accumulated batch, every rank's; the micro-batch's own count when Trainer gives none);
- ``"sequence"``: each sequence's mean NLL, averaged over the sequences of the
  micro-batch, so every sequence weighs the same whatever its length;
- a number lambda in [0, 1]: each sequence's NLL sum divided by ``count**lambda``,
  averaged over the sequences of the micro-batch (1 is ``"sequence"``, 0 the summed NLL
  per sequence).

``resolve_sft_normalization`` reads and checks it from any SFTConfig, so the trainer
also takes a plain one ("token").
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, field

from trl import SFTConfig

from ...checks import fail
from ...losses import length_exponent

SFT_NAMED_NORMALIZATIONS = ("token", "sequence")
EXPECTED = "'token', 'sequence' or a number lambda in [0, 1]"


def canonical_sft_normalization(value: object) -> str | float:
    """``value`` as "token", "sequence" or a float in [0, 1]; a number written as a string
    (as HfArgumentParser passes it from the command line) becomes that float.

    Raises:
        ValueError: naming ``length_normalization``, for anything else.
    """
    if isinstance(value, str):
        if value in SFT_NAMED_NORMALIZATIONS:
            return value
        with suppress(ValueError):
            value = float(value)
        if isinstance(value, str):
            fail("length_normalization", EXPECTED, repr(value))
    return length_exponent(value)  # the losses' own check and message for lambda


def resolve_sft_normalization(args: SFTConfig) -> float | None:
    """lambda of the per-sequence scores sum / count**lambda, or None for "token" (TRL's
    token mean); a plain SFTConfig reads as "token".

    Raises:
        ValueError: naming ``length_normalization``, for a value outside "token",
            "sequence" and [0, 1].
    """
    value = canonical_sft_normalization(getattr(args, "length_normalization", "token"))
    if value == "token":
        return None
    return 1.0 if value == "sequence" else value


@dataclass
class LenalignSFTConfig(SFTConfig):
    r"""TRL's SFTConfig, for LenalignSFTTrainer, with one more field.

    Parameters:
        length_normalization (`str` or `float`, *optional*, defaults to `"token"`):
            How the loss weighs the scored tokens of a batch. `"token"`: SFTTrainer's
            token mean, sum of token NLLs / `num_items_in_batch`. `"sequence"`: the mean
            over the micro-batch's sequences of each sequence's mean NLL (each sequence
            weighs equally). A number lambda in [0, 1]: the mean over the micro-batch's
            sequences of -sum_s / count_s**lambda (`"sequence"` is 1). Sequences without a
            scored token are left out of the mean. With gradient accumulation the
            per-sequence modes average the micro-batches' means (each micro-batch weighs
            equally), and DDP averages the ranks'. From the command line a number is given
            as text ("0.5").
    """

    # float | str | None, not str | float: HfArgumentParser keeps the non-str member of a
    # two-member union (float, which refuses "token") but str when None is a member; None
    # itself is refused by the check
    length_normalization: float | str | None = field(
        default="token",
        metadata={
            "help": "'token' (SFTTrainer's token mean over the batch), 'sequence' (mean over "
            "sequences of each sequence's mean NLL) or a number lambda in [0, 1] (mean over "
            "sequences of the NLL sum / count**lambda)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.length_normalization = canonical_sft_normalization(self.length_normalization)
