"""``lenalign.kernels`` ships inside lenalign, from an editable install and from a wheel,
never as a top-level ``kernels`` module (a PyPI package of that name exists)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import lenalign
import lenalign.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_into_lenalign():
    assert Path(lenalign.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert lenalign.kernels.__name__ == "lenalign.kernels"


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
    assert "lenalign/kernels/forward.py" in names
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
