"""The length study's results: one row per model, as results.csv, results.json and a table.

docs/length_study.md shows the table (``format_table``) of a run of the defaults.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import StudyConfig
from .data import StudyData

CSV_FILE = "results.csv"
JSON_FILE = "results.json"


# the columns of results.csv, in order; a run and the reference share them
COLUMNS = (
    "name",
    "normalization",
    "exponent",
    "base_beta",
    "beta",
    "loss_type",
    "gen_length",
    "gen_finished",
    "filler_rate",
    "task_score",
    "answer_score",
    "answer_logprob",
    "accuracy",
    "accuracy_plain",
    "margin",
    "seconds",
)


@dataclass
class StudyResult:
    """What a study measured: the reference's row, one row per run, and the set-up."""

    config: StudyConfig
    data: StudyData
    reference: dict[str, Any]
    runs: list[dict[str, Any]]
    seconds: float

    def to_json(self, command: str) -> dict[str, Any]:
        """The content of results.json; ``command`` is the command line that ran it."""
        settings = asdict(self.config)
        return {
            "command": command,
            "settings": settings,
            "data": {
                "train_pairs": len(self.data.train_pairs),
                "eval_pairs": len(self.data.eval_pairs),
                "chosen_length": self.data.chosen_length,
                "rejected_length": self.data.rejected_length,
                "measured_length_bias": self.data.chosen_length - self.data.rejected_length,
                "typical_length": self.data.typical_length,
                "answer_length": self.data.answer_length,
                "max_new_tokens": self.data.max_new_tokens,
            },
            "reference": self.reference,
            "runs": self.runs,
            "seconds": self.seconds,
        }


def write_csv(result: StudyResult, path: Path) -> None:
    """One line per model, the reference first; empty cells where a column does not apply."""
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        for row in [result.reference, *result.runs]:
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


# the columns of the printed and documented table: header, results key, number format
TABLE = (
    ("beta", "beta", "{:.3g}"),
    ("gen length", "gen_length", "{:.2f}"),
    ("finished", "gen_finished", "{:.2f}"),
    ("filler", "filler_rate", "{:.2f}"),
    ("task score", "task_score", "{:.3f}"),
    ("answer score", "answer_score", "{:.3f}"),
    ("answer log-prob", "answer_logprob", "{:.2f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("accuracy (plain)", "accuracy_plain", "{:.3f}"),
)


def format_table(result: StudyResult) -> str:
    """The results as a Markdown table, as docs/length_study.md shows them."""
    lines = [
        "| configuration | " + " | ".join(header for header, _, _ in TABLE) + " |",
        "|---|" + "---:|" * len(TABLE),
    ]
    for row in [result.reference, *result.runs]:
        cells = [row["normalization"] or row["name"]]
        cells += [_cell(row[key], spec) for _, key, spec in TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else spec.format(value)
