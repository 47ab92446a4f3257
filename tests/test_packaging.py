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


def run_in_root(code: str, *, cwd: Path = ROOT, path_zero: str = str(ROOT)) -> str:
    """``code`` in a fresh interpreter whose sys.path[0] is ``path_zero`` (the checkout's
    root, or '' for the working directory, as ``python -c`` and notebooks have it), as for
    ``python -m pytest``, a script or a notebook started there; its output."""
    probe = f"import sys; sys.path.insert(0, {path_zero!r})\n{code}"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


BUILD_A_MODEL = (
    "import transformers\n"
    "config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, "
    "num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)\n"
    "model = transformers.LlamaForCausalLM(config)\n"
)


@pytest.mark.parametrize(
    "path_zero", [str(ROOT), "", str(ROOT) + "/."], ids=["root", "working-directory", "alias"]
)
def test_the_checkout_root_does_not_shadow_an_installed_kernels_package(path_zero):
    # transformers imports Hugging Face's `kernels` (its import name) when it builds a model;
    # from the root, the top-level kernels/ folder used to answer in its place
    try:
        installed = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers >= 5.25 brings it)")
    init = Path(installed.locate_file("kernels/__init__.py")).resolve()
    code = BUILD_A_MODEL + (
        "sys.path.insert(1, sys.path[0])\n"  # the root twice, as a notebook may have it
        "import pathlib, kernels, lenalign, lenalign.kernels\n"
        "assert lenalign.kernels.row_logprob_forward is not None\n"
        "assert lenalign.kernels.__name__ == 'lenalign.kernels'\n"
        "print(pathlib.Path(kernels.__file__).resolve())\n"
    )
    assert run_in_root(code, path_zero=path_zero).strip() == str(init)


def test_the_checkout_root_gives_an_empty_kernels_namespace_when_none_is_installed():
    # with no `kernels` installed, the name must not reach lenalign's device code: it is
    # what Python makes of a folder that is no package, an empty namespace, which
    # transformers' availability check reads as "not installed"
    code = (
        "import importlib.machinery\n"
        "find_spec = importlib.machinery.PathFinder.find_spec\n"
        "def hide_the_installed(name, path=None, target=None):\n"
        "    if name == 'kernels' and path is not None:\n"
        "        return None\n"
        "    return find_spec(name, path, target)\n"
        "importlib.machinery.PathFinder.find_spec = hide_the_installed\n"
        "import importlib.metadata\n"
        "version = importlib.metadata.version\n"
        "def no_metadata(name):\n"
        "    if name == 'kernels':\n"
        "        raise importlib.metadata.PackageNotFoundError(name)\n"
        "    return version(name)\n"
        "importlib.metadata.version = no_metadata\n"
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None and list(kernels.__path__) == []\n"
        "try:\n"
        "    from kernels import row_logprob_forward\n"
        "except ImportError as error:\n"
        "    print('import error:', error)\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "print('available:', is_kernels_available())\n"
    )
    out = run_in_root(code)
    assert "import error: cannot import name 'row_logprob_forward'" in out
    assert "available: False" in out


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


def test_a_second_name_for_the_root_does_not_loop(tmp_path):
    # a bind mount (or a case-insensitive file system) reaches the root by another name
    # that realpath does not collapse: the handover must not find this folder again there
    alias = tmp_path / "alias"
    alias.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(ROOT), str(alias)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        code = (
            f"sys.path.insert(1, {str(alias)!r})\n"
            "import kernels, pathlib\n"
            "print(pathlib.Path(getattr(kernels, '__file__', None) or '.').resolve())\n"
        )
        out = run_in_root(code, cwd=tmp_path)
    finally:
        subprocess.run(["umount", str(alias)], check=True)
    assert Path(out.strip()) != (ROOT / "kernels" / "__init__.py").resolve()


def test_make_on_a_machine_whose_python_has_torch_installs_nothing():
    # a GPU box: its python3 is a venv with torch and no network; make must neither create
    # a venv nor call pip, and must run that interpreter with the checkout on PYTHONPATH
    dry = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "venv", "test", "bench", f"PYTHON={sys.executable}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    commands = dry.stdout
    assert "pip" not in commands and "-m venv" not in commands
    assert f'PYTHONPATH="{ROOT}' in commands
    assert f"{sys.executable} -m pytest -q tests" in commands
    assert f"{sys.executable} -m lenalign.cli bench" in commands
