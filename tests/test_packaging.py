"""``lenalign.kernels`` ships inside lenalign, from an editable install and from a wheel,
never as a top-level ``kernels`` module (a PyPI package of that name exists)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from triton_interpreter import interpreter_problem

import lenalign
import lenalign.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_into_lenalign():
    assert Path(lenalign.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert lenalign.kernels.__name__ == "lenalign.kernels"


def test_the_checkout_imports_as_installed_without_an_install():
    # lenalign/kernels links to kernels/, so that a machine that cannot install (a GPU box
    # without an index) runs the checkout from PYTHONPATH with lenalign.kernels in place
    link = ROOT / "lenalign" / "kernels"
    assert link.is_symlink() and link.readlink() == Path("..", "kernels")
    assert link.resolve() == ROOT / "kernels"


def test_wheel_ships_lenalign_kernels_and_imports(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("lenalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert names.count("lenalign/kernels/forward.py") == 1
    assert "lenalign/kernels/backward.py" in names
    assert not any(name.startswith("kernels/") for name in names)
    # every wing ships, and so does the marker that makes type checkers read the hints
    for wing in ("integrations", "distributed", "train", "study", "bench"):
        assert f"lenalign/{wing}/__init__.py" in names
    assert "lenalign/py.typed" in names
    (metadata,) = (name for name in names if name.endswith(".dist-info/METADATA"))
    assert "License-Expression: MIT" in zipfile.ZipFile(wheel).read(metadata).decode()
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # an isolated interpreter that finds lenalign in the unpacked wheel before this checkout
    probe = (
        f"import sys; sys.path.insert(0, {str(site)!r}); "
        "import lenalign, lenalign.kernels, pathlib; "
        "print(pathlib.Path(lenalign.kernels.__file__).parent.parent)"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert Path(result.stdout.strip()).resolve() == (site / "lenalign").resolve()


def run_in_root(code: str, *, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose sys.path[0] is the checkout's root, as for
    ``python -m pytest``, ``python -c``, a script or a notebook started there."""
    probe = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"
    return subprocess.run(
        [sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_the_checkout_root_does_not_shadow_an_installed_kernels_package():
    # transformers imports Hugging Face's `kernels` (its import name) when it builds a model;
    # from the root, the top-level kernels/ folder used to answer in its place
    code = (
        "import importlib.metadata, pathlib\n"
        "import transformers\n"
        "config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, "
        "intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, "
        "num_key_value_heads=1)\n"
        "model = transformers.LlamaForCausalLM(config)\n"
        "import kernels, lenalign, lenalign.kernels\n"
        "here = pathlib.Path(sys.path[0], 'kernels').resolve()\n"
        "assert pathlib.Path(kernels.__file__).resolve().parent != here, kernels.__file__\n"
        "assert importlib.metadata.version('kernels')\n"
        "assert lenalign.kernels.row_logprob_forward is not None\n"
        "assert lenalign.kernels.__name__ == 'lenalign.kernels'\n"
        "print('kernels from', kernels.__file__)\n"
    )
    assert importlib.util.find_spec("kernels") is not None, "Hugging Face's kernels"
    result = run_in_root(code)
    assert result.returncode == 0, result.stderr
    assert "site-packages" in result.stdout


def test_the_checkout_root_gives_no_kernels_module_when_none_is_installed():
    # every site-packages folder left out: `import kernels` then finds nothing, and must not
    # fall back to lenalign's device code under a name that is not its own
    code = (
        "sys.path[1:] = [p for p in sys.path[1:] if 'site-packages' not in p]\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as error:\n"
        "    assert error.name == 'kernels', error.name\n"
        "    assert 'kernels' not in sys.modules\n"
        "    print('none:', error)\n"
        "else:\n"
        "    raise AssertionError(f'imported {kernels.__file__}')\n"
    )
    result = run_in_root(code, cwd=ROOT / "tests")
    assert result.returncode == 0, result.stderr
    assert "lenalign.kernels" in result.stdout


@pytest.mark.parametrize(
    ("triton", "numpy", "refused"),
    [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False)],
)
def test_a_triton_interpreter_that_cannot_run_with_this_numpy_stops_the_tests(
    monkeypatch, triton, numpy, refused
):
    versions = {"triton": triton, "numpy": numpy}
    monkeypatch.setattr(importlib.metadata, "version", versions.__getitem__)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = interpreter_problem()
    assert (problem is not None) == refused
    if refused:
        assert "numpy < 2.4" in problem and f"Triton {triton}" in problem
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels are not affected
    assert interpreter_problem() is None
