"""The length study's figure: generation length against task score, one point per run.

``lenalign study`` draws it after a study; ``python -m lenalign.study.plot RESULTS_JSON
[PNG]`` draws it again from a results.json (next to it, by default), for instance after
editing the style here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any

DEFAULT_FIGURE = "length_study.png"
# marker of the i-th smallest base beta: one shape per beta across normalizations
MARKERS = ("v", "o", "^", "s", "D", "P", "X")
# where a label may go around its point, in typographic points, tried in this order
LABEL_DIRECTIONS = (
    (1, 0.4),
    (1, -1.2),
    (-1, 0.4),
    (-1, -1.2),
    (0, 1),
    (0, -1.6),
    (1, 1.5),
    (1, -2.5),
    (-1, 1.5),
    (-1, -2.5),
)
LABEL_DISTANCES = (7, 16, 26, 38, 52, 70)
# half the side of the square around a marker that labels keep clear of, in pixels
MARKER_CLEARANCE = 5

Label = tuple[str, tuple[float, float], Any]  # text, point in data coordinates, colour


def plot_study(results: dict[str, Any], path: Path) -> str | None:
    """Draw the figure of a study's results.json content into ``path`` (a PNG).

    One point per run at (mean generation length, task score): the colour says the
    normalization (sum to mean along viridis), the marker the base beta; the runs of one
    normalization are joined from the smallest beta to the largest, and each point is
    labelled. The reference is a black star, and a dotted line marks the mean length of
    the correct answers (EOS included).

    Returns:
        None once drawn; else why not (matplotlib is not installed).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    reference, data, settings = results["reference"], results["data"], results["settings"]
    figure, axis = plt.subplots(figsize=(9.5, 6.0))
    labels = _draw_runs(axis, results["runs"])
    point = (reference["gen_length"], reference["task_score"])
    axis.plot(*point, "*", color="black", markersize=15)
    labels.insert(0, ("reference (SFT)", point, "black"))
    axis.axvline(data["answer_length"], color="grey", linestyle=":", linewidth=1)
    axis.text(
        data["answer_length"],
        0.02,
        " correct answers' length",
        color="grey",
        fontsize=7,
        transform=axis.get_xaxis_transform(),
    )
    axis.set_xlabel("mean greedy generation length on held-out prompts (tokens, EOS included)")
    axis.set_ylabel("task score (fraction of correct positions)")
    axis.set_ylim(-0.03, 1.05)
    axis.grid(alpha=0.3)
    axis.set_title(
        f"lenalign study: {settings['loss_type']}, length bias {settings['length_bias']:g} "
        f"tokens, {settings['steps']} steps per run, seed {settings['seed']}",
        fontsize=9,
    )
    figure.tight_layout()
    # labels go last: where they fit depends on the final axes and legends
    _place_labels(figure, axis, labels)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


def _draw_runs(axis: Any, runs: list[dict[str, Any]]) -> list[Label]:
    """Plot the runs' points, lines and the two legends; return the labels to place."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = plt.get_cmap("viridis")
    base_betas = sorted({run["base_beta"] for run in runs})
    marker = {beta: MARKERS[i % len(MARKERS)] for i, beta in enumerate(base_betas)}
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["normalization"], []).append(run)
    labels: list[Label] = []
    handles = []
    for normalization, group in groups.items():
        name = normalization.replace("lambda=", "λ=")
        group = sorted(group, key=lambda run: run["beta"])
        # viridis' yellow end is hard to read on white; stop short of it
        colour = colours(0.85 * group[0]["exponent"])
        points = [(run["gen_length"], run["task_score"]) for run in group]
        axis.plot(*zip(*points, strict=True), "-", color=colour, linewidth=1, alpha=0.5)
        for run, point in zip(group, points, strict=True):
            axis.plot(*point, marker[run["base_beta"]], color=colour, markersize=7)
            labels.append((f"{name} β={run['beta']:.3g}", point, colour))
        handles.append(Line2D([], [], color=colour, marker="o", label=name))
    legend = {"fontsize": 8, "title_fontsize": 8}
    # outside the axes, on the right, where no point can hide behind them
    axis.add_artist(
        axis.legend(
            handles=handles,
            title="length_normalization",
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            **legend,
        )
    )
    beta_handles = [
        Line2D([], [], color="grey", marker=marker[beta], linestyle="", label=f"{beta:g}")
        for beta in base_betas
    ]
    axis.legend(
        handles=beta_handles,
        title="base β (sum scale)",
        loc="upper left",
        bbox_to_anchor=(1.02, 0.55),
        **legend,
    )
    return labels


def _place_labels(figure: Any, axis: Any, labels: list[Label]) -> None:
    """Label each point where its label covers no legend, other marker or earlier label.

    Places are tried nearest first (``LABEL_DISTANCES`` times ``LABEL_DIRECTIONS``); a
    label set away from its point gets a thin line to it. A label that finds no free
    place goes next to its point regardless.
    """
    from matplotlib.legend import Legend
    from matplotlib.transforms import Bbox

    renderer = figure.canvas.get_renderer()
    frame = axis.get_window_extent(renderer)
    legends = [c.get_window_extent(renderer) for c in axis.get_children() if isinstance(c, Legend)]
    markers = []
    for _, point, _ in labels:
        x, y = axis.transData.transform(point)
        side = MARKER_CLEARANCE
        markers.append(Bbox.from_extents(x - side, y - side, x + side, y + side))
    placed: list[Any] = []
    for index, (text, point, colour) in enumerate(labels):
        obstacles = legends + placed + markers[:index] + markers[index + 1 :]
        style = {"fontsize": 7, "color": colour, "va": "center", "textcoords": "offset points"}
        offsets = [
            (dx * distance, dy * distance)
            for distance, (dx, dy) in product(LABEL_DISTANCES, LABEL_DIRECTIONS)
        ]
        for offset in offsets:
            box = _text_box(axis, renderer, text, point, offset, style)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in obstacles):
                break
        else:
            offset = offsets[0]
            box = _text_box(axis, renderer, text, point, offset, style)
        line = {"arrowstyle": "-", "color": colour, "linewidth": 0.5, "shrinkB": 4}
        near = offset == offsets[0]
        axis.annotate(
            text,
            point,
            xytext=offset,
            ha=_align(offset[0]),
            arrowprops=None if near else line,
            **style,
        )
        placed.append(box)


def _text_box(
    axis: Any,
    renderer: Any,
    text: str,
    point: tuple[float, float],
    offset: tuple[float, float],
    style: dict[str, Any],
) -> Any:
    """The display box that a label of ``text`` set ``offset`` points from ``point`` takes."""
    trial = axis.annotate(text, point, xytext=offset, ha=_align(offset[0]), **style)
    box = trial.get_window_extent(renderer)
    trial.remove()
    return box


def _align(dx: float) -> str:
    """Horizontal alignment of a label set ``dx`` away: it grows away from its point."""
    return "left" if dx > 0 else "right" if dx < 0 else "center"


def main(argv: Sequence[str]) -> int:
    """``python -m lenalign.study.plot RESULTS_JSON [PNG]``; 2 on bad input."""
    if not 1 <= len(argv) <= 2:
        print("usage: python -m lenalign.study.plot RESULTS_JSON [PNG]", file=sys.stderr)
        return 2
    source = Path(argv[0])
    if not source.is_file():
        print(f"lenalign.study.plot: error: results: no such file {source}", file=sys.stderr)
        return 2
    target = Path(argv[1]) if len(argv) == 2 else source.with_name(DEFAULT_FIGURE)
    reason = plot_study(json.loads(source.read_text()), target)
    if reason is not None:
        print(f"lenalign.study.plot: error: {reason}", file=sys.stderr)
        return 2
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
