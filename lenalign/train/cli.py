"""``lenalign train``: one flag per ``TrainConfig`` field, and ``--config`` for a file.

Values come from the defaults, then the config file, then the flags. Also runs as
``python -m lenalign.train.cli``, and on several processes as ``torchrun
--nproc-per-node N -m lenalign.cli train --distributed ddp|fsdp ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from .checkpoint import METRICS_FILE
from .config import TrainConfig
from .loop import train
from .metrics import format_metrics


def _parse_length_normalization(text: str) -> str | float:
    if text in ("sum", "mean"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'sum', 'mean' or a number in [0, 1], got {text!r}"
        ) from None


# how a flag's text becomes a field value, by the field's annotation
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "str | None": str,
    "str | float": _parse_length_normalization,
}


def build_parser() -> argparse.ArgumentParser:
    """``lenalign train``'s parser: ``--config`` and one flag per TrainConfig field.

    Only the flags given on the command line appear in the parsed namespace, so that
    they override a config file and the file overrides the defaults.
    """
    parser = argparse.ArgumentParser(
        prog="lenalign train",
        description="Preference-train a causal LM through lenalign's fused loss. "
        "Without arguments: the embedded tiny Llama on the embedded synthetic task, offline.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="JSON or YAML file of field values; flags override it")
    for option in fields(TrainConfig):
        flag = "--" + option.name.replace("_", "-")
        help_text = f"{option.metadata['help']} (default: {option.default})"
        if option.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=_FLAG_TYPES[option.type], help=help_text)
    return parser


def config_from_args(argv: Sequence[str]) -> TrainConfig:
    """The TrainConfig of ``lenalign train`` arguments: defaults, then file, then flags."""
    values = vars(build_parser().parse_args(list(argv)))
    config_file = values.pop("config", None)
    if config_file is not None:
        return TrainConfig.from_file(config_file, **values)
    return TrainConfig(**values)


def main(argv: Sequence[str]) -> int:
    """``lenalign train [flags]``: train, print a summary; 2 on bad input, with the reason."""
    try:
        config = config_from_args(argv)
        result = train(config)
    except ValueError as error:
        print(f"lenalign train: error: {error}", file=sys.stderr)
        return 2
    if result.rank != 0:
        return 0  # under torchrun, rank 0 prints the summary for all
    print(f"done: {result.step} steps in {result.seconds:.0f} s")
    if result.train_log:
        first, last = result.train_log[0], result.train_log[-1]
        print(
            f"train  loss {first['loss']:.3f} -> {last['loss']:.3f}  "
            f"accuracy {first['accuracy']:.2f} -> {last['accuracy']:.2f}  (steps "
            f"{first['step']} and {last['step']})"
        )
    if result.eval_log:
        print(f"eval   {format_metrics(result.eval_log[-1])}")
    print(f"metrics     {Path(config.output_dir) / METRICS_FILE}")
    print(f"checkpoint  {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
