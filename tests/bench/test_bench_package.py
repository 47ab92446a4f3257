"""The bench wing as a package: its public names, the modules it replaced, and that
``import lenalign`` leaves it alone."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest

import lenalign.bench

# the top-level modules that lenalign.bench replaced
OLD_MODULES = ("bench_case", "bench_contenders", "bench_report", "codegen")
MODULES = ("workload", "probes", "contenders", "machine", "case", "report", "cli", "codegen")


def test_every_public_name_resolves():
    for name in lenalign.bench.__all__:
        assert getattr(lenalign.bench, name) is not None, name


@pytest.mark.parametrize("name", OLD_MODULES)
def test_old_top_level_modules_are_gone(name):
    assert importlib.util.find_spec(f"lenalign.{name}") is None


def test_bench_is_a_package_not_the_old_module():
    assert lenalign.bench.__path__, "lenalign.bench should be a package"


def _fresh(statement: str) -> str:
    probe = f"import sys; {statement}"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return result.stdout


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    # an import loop shows as a module that fails when it is the first one imported
    _fresh(f"import lenalign.bench.{module}")


def test_import_lenalign_does_not_import_the_bench():
    loaded = _fresh(
        "import lenalign; print(any(m.startswith('lenalign.bench') for m in sys.modules))"
    )
    assert loaded.strip() == "False"
