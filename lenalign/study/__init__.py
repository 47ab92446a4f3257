"""The length study: does averaging log-likelihoods trade generation length for score?

``lenalign study`` (``lenalign.study.cli``) fine-tunes the embedded tiny Llama on a
digit-sorting task into a reference, then preference-trains a copy of it through
``lenalign.train`` once per length normalization and beta, on pairs whose chosen
completions are longer, and measures each model's greedy generation length against its
task score. docs/length_study.md shows and reads a run of the defaults.

The modules, each with one concern:

- ``config``: ``StudyConfig``, ``QUICK`` (``--quick``), ``length_exponent``,
  ``normalization_label``, ``scaled_beta``.
- ``sort_task``: the task and its length-biased pairs: ``make_sort_pairs``,
  ``sort_prompt``, ``sort_answer``, ``sort_score``, ``strip_filler``.
- ``data``: ``StudyData``, ``build_data``, ``HeldOut``, ``demonstration_rows``,
  ``demonstration_batch``.
- ``run``: ``run_study``, ``train_reference``, ``preference_config``, ``evaluate_model``.
- ``results``: ``StudyResult``, ``COLUMNS``, ``write_csv``, ``format_table``.
- ``plot``: the figure, ``plot_study``; ``python -m lenalign.study.plot RESULTS_JSON``
  draws it again. Not imported here, so that running it with ``-m`` finds it unloaded.
"""

from importlib import import_module
from typing import Any

# name -> module, imported on first use: ``python -m lenalign.study.plot`` imports this
# package first, and redrawing a figure needs matplotlib, not the trainer's transformers
_PUBLIC = {
    **dict.fromkeys(
        ("QUICK", "StudyConfig", "length_exponent", "normalization_label", "scaled_beta"),
        "config",
    ),
    **dict.fromkeys(
        ("HeldOut", "StudyData", "build_data", "demonstration_batch", "demonstration_rows"),
        "data",
    ),
    **dict.fromkeys(("COLUMNS", "StudyResult", "format_table", "write_csv"), "results"),
    **dict.fromkeys(("evaluate_model", "preference_config", "run_study", "train_reference"), "run"),
    **dict.fromkeys(
        ("make_sort_pairs", "sort_answer", "sort_prompt", "sort_score", "strip_filler"),
        "sort_task",
    ),
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)


__all__ = [
    "COLUMNS",
    "QUICK",
    "HeldOut",
    "StudyConfig",
    "StudyData",
    "StudyResult",
    "build_data",
    "demonstration_batch",
    "demonstration_rows",
    "evaluate_model",
    "format_table",
    "length_exponent",
    "make_sort_pairs",
    "normalization_label",
    "preference_config",
    "run_study",
    "scaled_beta",
    "sort_answer",
    "sort_prompt",
    "sort_score",
    "strip_filler",
    "train_reference",
    "write_csv",
]
