"""``lenalign study``: one flag per ``StudyConfig`` field, and ``--quick``.

Values come from the defaults, then ``--quick``, then the flags. The command writes
results.csv, results.json and the figure and prints the table. ``write_outputs`` lives
here rather than in ``results`` because it draws the figure: ``lenalign.study.plot``
runs as a script too, so only the command imports it, not the package. Also runs as
``python -m lenalign.study.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import QUICK, STUDY_LOSS_TYPES, Normalization, StudyConfig
from .plot import DEFAULT_FIGURE, plot_study
from .results import CSV_FILE, JSON_FILE, StudyResult, format_table, write_csv
from .run import run_study


def write_outputs(result: StudyResult, output_dir: Path, command: str) -> dict[str, Path]:
    """Write results.csv, results.json and, when matplotlib is installed, the figure.

    Returns the paths written, by kind ("csv", "json", "figure").
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": output_dir / CSV_FILE, "json": output_dir / JSON_FILE}
    write_csv(result, paths["csv"])
    results = result.to_json(command)
    paths["json"].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    figure = output_dir / DEFAULT_FIGURE
    if plot_study(results, figure) is None:
        paths["figure"] = figure
    return paths


def _parse_normalizations(text: str) -> tuple[Normalization, ...]:
    values: list[Normalization] = []
    for item in text.split(","):
        item = item.strip()
        if item in ("sum", "mean"):
            values.append(item)
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected 'sum', 'mean' or numbers in [0, 1], comma-separated, got {item!r}"
            ) from None
    return tuple(values)


def _parse_betas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


_HELP = {
    "length_bias": "mean extra tokens (filler) of chosen over rejected completions",
    "loss_type": f"one of {', '.join(STUDY_LOSS_TYPES)}",
    "normalizations": "comma-separated length_normalization values: sum, mean, lambda in [0, 1]",
    "betas": "comma-separated betas on the sum scale; lambda uses beta * L**lambda",
    "seed": "seed of the model, the data and the data order, the same for every run",
    "train_size": "training pairs (the SFT phase uses their prompts)",
    "eval_size": "held-out pairs and prompts evaluated",
    "sft_steps": "supervised steps that make the reference",
    "sft_learning_rate": "peak learning rate of the supervised phase",
    "steps": "preference-training steps per configuration",
    "learning_rate": "peak learning rate of preference training",
    "batch_size": "pairs per preference step (SFT steps take twice as many answers)",
    "cpu_threads": "torch CPU threads (1 suits the tiny model, see docs/trainer.md)",
    "output_dir": "where results.csv, results.json and length_study.png go",
}
_PARSERS: dict[str, Callable[[str], Any]] = {
    "length_bias": float,
    "loss_type": str,
    "normalizations": _parse_normalizations,
    "betas": _parse_betas,
    "sft_learning_rate": float,
    "learning_rate": float,
    "output_dir": str,
}


def build_parser() -> argparse.ArgumentParser:
    """``lenalign study``'s parser: ``--quick`` and one flag per StudyConfig field.

    Only the flags given appear in the parsed namespace, so that they override ``--quick``.
    """
    parser = argparse.ArgumentParser(
        prog="lenalign study",
        description="Train the embedded tiny Llama on a sort task whose chosen completions "
        "are longer, once per length normalization and beta; plot generation length "
        "against task score. Defaults: about 6 minutes on 2 CPU cores.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="sum and mean at one beta, fewer pairs and steps (under 2 minutes); "
        "flags given override its values",
    )
    for option in fields(StudyConfig):
        default = option.default
        if isinstance(default, tuple):
            default = ",".join(str(v) for v in default)
        parser.add_argument(
            "--" + option.name.replace("_", "-"),
            type=_PARSERS.get(option.name, int),
            help=f"{_HELP[option.name]} (default: {default})",
        )
    return parser


def config_from_args(argv: Sequence[str]) -> StudyConfig:
    """The StudyConfig of ``lenalign study`` arguments: defaults, then --quick, then flags."""
    values = vars(build_parser().parse_args(list(argv)))
    quick = values.pop("quick", False)
    return StudyConfig(**({**QUICK, **values} if quick else values))


def main(argv: Sequence[str]) -> int:
    """``lenalign study [flags]``: run, write the results, print the table; 2 on bad input."""
    try:
        config = config_from_args(argv)
    except ValueError as error:
        print(f"lenalign study: error: {error}", file=sys.stderr)
        return 2
    result = run_study(config, log=lambda line: print(line, flush=True))
    command = " ".join(["lenalign", "study", *argv])
    paths = write_outputs(result, Path(config.output_dir), command)
    print()
    print(format_table(result))
    print()
    for kind in ("csv", "json", "figure"):
        if kind in paths:
            print(f"{kind:<7}{paths[kind]}")
    if "figure" not in paths:
        print("figure not drawn: matplotlib is not installed (pip install matplotlib)")
    print(f"done in {result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
