"""The train, study and integrations wings as packages: their public names, the modules
they replaced, and what importing each pulls in."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest

import lenalign.train

# the top-level modules that lenalign.train and lenalign.study replaced
OLD_MODULES = ("train_data", "synthetic", "tiny", "study_task", "study_plot")


def test_the_trainer_package_still_exposes_train_config_and_train():
    from lenalign.train import TrainConfig, train

    assert TrainConfig is lenalign.train.config.TrainConfig
    assert train is lenalign.train.loop.train and callable(train)
    assert train.__module__ == "lenalign.train.loop"


@pytest.mark.parametrize(
    "wing", ["lenalign.train", "lenalign.study", "lenalign.integrations", "lenalign.distributed"]
)
def test_every_public_name_resolves(wing):
    module = importlib.import_module(wing)
    for name in module.__all__:
        assert getattr(module, name) is not None, name


@pytest.mark.parametrize("name", OLD_MODULES)
def test_old_top_level_modules_are_gone(name):
    assert importlib.util.find_spec(f"lenalign.{name}") is None


def imported_after(statement: str) -> set[str]:
    """The top modules of lenalign and transformers that ``statement`` imports, in a fresh
    interpreter."""
    probe = (
        f"import sys; {statement}; "
        "print(' '.join(m for m in sys.modules if m.startswith(('lenalign', 'transformers'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(result.stdout.split())


def test_import_lenalign_does_not_import_transformers_or_the_wings():
    modules = imported_after("import lenalign")
    assert "transformers" not in modules
    wings = {"lenalign.train", "lenalign.study", "lenalign.integrations", "lenalign.distributed"}
    assert not wings & modules


def test_the_study_figure_redraws_without_the_trainer():
    # python -m lenalign.study.plot imports lenalign.study first; the package is lazy
    modules = imported_after("import lenalign.study.plot")
    assert "transformers" not in modules
    assert "lenalign.train" not in modules


def test_the_hugging_face_forwards_do_not_import_the_trainer():
    modules = imported_after("import lenalign.integrations.hf")
    assert "lenalign.train" not in modules
    assert "transformers" not in modules


@pytest.mark.parametrize("wing", ["train", "study"])
def test_cli_module_runs_as_a_script(wing):
    completed = subprocess.run(
        [sys.executable, "-m", f"lenalign.{wing}.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(f"usage: lenalign {wing}")
    # the package does not import its cli, which would make runpy warn
    assert "RuntimeWarning" not in completed.stderr
