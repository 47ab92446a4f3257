"""The outputs of ``lenalign bench``: console table, JSON, Markdown and a PNG chart.

Everything here formats the report dict that ``lenalign.bench.cli.main`` assembles from the
cases' results; nothing is measured or estimated here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20

# (header, formatter of a result row that ran) of the measured columns
Column = tuple[str, Callable[[dict], str]]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f} MiB"


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 10 else f"{seconds:.1f} s"


COLUMNS: list[Column] = [
    ("median", lambda row: _duration(row["median_s"])),
    ("time/eager", lambda row: _ratio(row["time_vs_eager"])),
    ("peak above inputs", lambda row: _mib(row.get("peak_bytes"))),
    ("peak/logits", lambda row: _ratio(row["peak_vs_logits"])),
    ("peak/eager", lambda row: _ratio(row["peak_vs_eager"])),
    ("floor/time", lambda row: f"{row['floor_bytes_per_s'] / 1e9:.1f} GB/s"),
    ("% of copy", lambda row: f"{row['floor_pct_of_copy']:.0f}%"),
    ("others' CPU", lambda row: _cores(row.get("other_cpu_cores"))),
]
HEADERS = ["mode", "contender", *(header for header, _ in COLUMNS)]


def _cells(row: dict) -> list[str]:
    """The table cells of one result; a row that did not run says why instead of a time."""
    lead = [row["mode"], row["contender"]]
    if row["status"] == "ok":
        return lead + [format_cell(row) for _, format_cell in COLUMNS]
    label = {"failed": "FAILED", "oom": "OUT OF MEMORY"}.get(row["status"], row["status"])
    return [*lead, f"{label}: {row['reason']}"]


def case_title(case: dict) -> str:
    """One line naming a case: shape, logits size, counted positions, copy bandwidth."""
    if case.get("error"):
        return f"{case['label']}: FAILED: {case['error']}"
    return (
        f"{case['label']}: logits {case['logits_bytes'] / MiB:.1f} MiB, "
        f"{case['counted_rows']} of {case['positions']} positions counted, "
        f"device copy {case['copy_bytes_per_s'] / 1e9:.1f} GB/s"
    )


def _skipped(case: dict) -> list[str]:
    """One line per skipped contender and reason, naming the modes it covers."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for row in case["results"]:
        if row["status"] == "skipped":
            grouped.setdefault((row["contender"], row["reason"]), []).append(row["mode"])
    return [
        f"skipped {name} ({', '.join(modes)}): {reason}"
        for (name, reason), modes in grouped.items()
    ]


def machine_line(report: dict) -> str:
    """The machine and software of a run, from the first case that reached the worker."""
    for case in report["cases"]:
        machine = case.get("machine")
        if machine:
            return (
                f"{machine['device']}: {machine['name']}; torch {machine['torch']}, "
                f"triton {machine['triton']}, Python {machine['python']}"
                + "".join(
                    f", {dist} {version or 'not installed'}"
                    for dist, version in machine["packages"].items()
                )
            )
    return f"{report['device']} (no case reached the worker)"


def _notes(report: dict) -> list[str]:
    notes = [
        f"{report['dtype']} logits, shift=True",
        f"time: median of up to {report['repeats']} timed calls after a checked first call "
        f"(at least {report['min_repeats']}; no more once they take "
        f"{report['row_seconds']:g} s)",
        "peak: memory above the inputs during one call, the returned gradient included",
        "floor/time: the byte floor (element size x V x counted rows forward; with backward "
        "x (2 counted rows + all positions), since the gradient's uncounted rows are written "
        "too) over the median time, and that as a percentage of the device's copy bandwidth",
        "others' CPU: cores' worth of CPU time that other processes used while the row was "
        "timed; well above 0, they disturbed the timing",
    ]
    if report.get("background_load"):
        notes.append(
            f"background load: {report['background_load']} spinning process(es), each "
            "keeping a core busy while the cases ran (--background-load); the others' CPU "
            "column counts them"
        )
    memory_notes = {case.get("memory_note") for case in report["cases"]} - {None}
    notes += [f"peak memory not measured: {note}" for note in sorted(memory_notes)]
    return notes


def _aligned(rows: list[list[str]]) -> list[str]:
    """Align full rows in columns; a short row (one that did not run) ends in free text."""
    full = [cells for cells in rows if len(cells) == len(HEADERS)]
    widths = [max(len(cells[i]) for cells in full) for i in range(len(HEADERS))]
    for i in (0, 1):
        widths[i] = max(len(cells[i]) for cells in rows)
    lines = []
    for cells in rows:
        lead = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        rest = [cell.rjust(width) for cell, width in zip(cells[2:], widths[2:], strict=False)]
        lines.append("  ".join(lead + rest).rstrip())
    return lines


def format_table(report: dict) -> str:
    """The console table: one block per case, a row per mode and contender that ran."""
    lines = [f"lenalign bench ({report['seconds']:.0f} s): {machine_line(report)}"]
    lines += _notes(report)
    for case in report["cases"]:
        lines += ["", case_title(case)]
        rows = [_cells(row) for row in case["results"] if row["status"] != "skipped"]
        if rows:
            lines += ["  " + line for line in _aligned([HEADERS, *rows])]
        lines += ["  " + line for line in _skipped(case)]
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The same tables in Markdown, for docs/benchmarks.md."""
    lines = [
        f"Machine: {machine_line(report)}.",
        "",
        f"Command: `{report['command']}` ({report['seconds']:.0f} s, started {report['started']}).",
        "",
    ]
    lines += [f"- {note}." for note in _notes(report)]
    for case in report["cases"]:
        lines += ["", f"#### {case_title(case)}", ""]
        rows = [_cells(row) for row in case["results"] if row["status"] != "skipped"]
        if rows:
            lines.append("| " + " | ".join(HEADERS) + " |")
            lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADERS) - 2)) + "|")
            for cells in rows:
                padded = cells + [""] * (len(HEADERS) - len(cells))
                lines.append("| " + " | ".join(padded) + " |")
        skipped = _skipped(case)
        if skipped:
            lines += [""] + [f"- {line}" for line in skipped]
    return "\n".join(lines) + "\n"


def _strict_json(value: object) -> object:
    """Infinite check ratios (NaN outputs) as strings: strict JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(item) for item in value]
    return value


def write_json(report: dict, path: Path) -> None:
    """The full report, every measured time and check ratio included."""
    path.write_text(json.dumps(_strict_json(report), indent=2, allow_nan=False) + "\n")


def write_markdown(report: dict, path: Path) -> None:
    path.write_text(format_markdown(report))


def write_chart(report: dict, path: Path) -> str | None:
    """Bar charts of time and peak memory relative to eager; returns why not, if not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'lenalign[bench]')"
    groups = [
        (case, mode)
        for case in report["cases"]
        for mode in dict.fromkeys(row["mode"] for row in case["results"])
    ]
    names = list(
        dict.fromkeys(
            row["contender"]
            for case, _ in groups
            for row in case["results"]
            if row["status"] == "ok"
        )
    )
    # time ratios spread over decades (0.05x to 20x), memory ratios from 0 to about 3
    panels = [
        ("time_vs_eager", "median time / eager's (lower is faster)", "log"),
        ("peak_vs_logits", "peak memory above inputs / logits size", "linear"),
    ]
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(groups) + 4), 4.8))
    width = 0.8 / max(len(names), 1)
    for axis, (key, title, scale) in zip(axes, panels, strict=True):
        for index, name in enumerate(names):
            values = []
            for case, mode in groups:
                row = next(
                    (r for r in case["results"] if r["contender"] == name and r["mode"] == mode),
                    None,
                )
                ok = row is not None and row["status"] == "ok" and row.get(key) is not None
                values.append(row[key] if ok else float("nan"))
            positions = [
                group + (index - (len(names) - 1) / 2) * width for group in range(len(groups))
            ]
            axis.bar(positions, values, width, label=name)
        axis.set_xticks(range(len(groups)))
        axis.set_xticklabels([f"{case['label']}\n{mode}" for case, mode in groups], fontsize=7)
        axis.set_title(title, fontsize=10)
        axis.set_yscale(scale)
        axis.axhline(1.0, color="black", linewidth=0.6)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"lenalign bench: {machine_line(report)}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None
