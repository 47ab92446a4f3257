"""The kernels compiled for real, for Hopper (sm_90) and Ampere (sm_80), without a GPU.

Everything else on a CPU machine runs the kernels through Triton's interpreter, which
never reaches code generation. ``lenalign codegen`` runs the compiler down to machine
code with the ptxas and cuobjdump in Triton's wheel; here it runs as users run it, in a
subprocess with TRITON_INTERPRET unset, over every dtype and the vocabularies of the
benchmark suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lenalign.bench.codegen import VOCABULARIES, resident_warps, specialize

KERNELS = {"row_logprob_forward_kernel", "row_logprob_backward_kernel", "segment_reduce_kernel"}
# vocabularies whose rows start 16-byte aligned in every dtype: stride a multiple of 16
ALIGNED = [v for v in VOCABULARIES if v % 16 == 0]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="this Triton has no NVIDIA backend to compile with",
)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("codegen") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "lenalign.cli", "codegen", "--arch", "sm90", "sm80"]
    result = subprocess.run(
        [*command, "--json", str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| row_logprob_forward_kernel | sm90 |" in result.stdout
    return json.loads(Path(out).read_text())


def test_every_kernel_compiles_for_every_dtype_and_architecture(builds: list[dict]) -> None:
    for arch in ("sm90", "sm80"):
        for dtype in ("bf16", "fp16", "fp32", "fp64"):
            compiled = {b["kernel"] for b in builds if b["arch"] == arch and dtype in b["dtypes"]}
            assert compiled == KERNELS, (arch, dtype)
            for vocab in VOCABULARIES:
                serving = [
                    b
                    for b in builds
                    if b["arch"] == arch and dtype in b["dtypes"] and vocab in b["vocabularies"]
                ]
                assert {b["kernel"] for b in serving} == KERNELS, (arch, dtype, vocab)


def test_no_register_spills(builds: list[dict]) -> None:
    for build in builds:
        assert build["registers"] is not None, "cuobjdump gave no resource usage"
        assert build["spill_bytes"] == 0, build


@pytest.mark.parametrize("kernel", ["row_logprob_forward_kernel", "row_logprob_backward_kernel"])
def test_aligned_rows_are_read_with_128_bit_loads(builds: list[dict], kernel: str) -> None:
    # the row pointer arithmetic keeps Triton's divisibility facts: with a row stride a
    # multiple of 16 elements the logits are read 16 bytes per load, not one element
    for build in builds:
        if build["kernel"] == kernel and set(build["vocabularies"]) <= set(ALIGNED):
            assert build["loads"].startswith("128 bit"), build


def test_backward_needs_no_barrier(builds: list[dict]) -> None:
    # the backward is elementwise given the saved (m, log_sum): no cross-warp reduction
    for build in builds:
        if build["kernel"] == "row_logprob_backward_kernel":
            assert build["barriers"] == 0, build


def test_recorded_launches_specialize_as_the_jit_does() -> None:
    native = pytest.importorskip("triton._C.libtriton")
    if not hasattr(native, "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    from triton.backends.nvidia.compiler import CUDABackend

    tensor = torch.randn(40, dtype=torch.bfloat16)
    values = [0, 1, 2, 16, 17, 128256, 50257, 2**31, 2**31 + 16, tensor, tensor[1:]]
    for value in values:
        kind, constant, divisible = specialize(value)
        expected_kind, expected_attr = native.native_specialize_impl(
            CUDABackend, value, False, True, True
        )
        assert kind == expected_kind, value
        if kind == "constexpr":
            assert constant == expected_attr
        else:
            assert divisible == ("D" in expected_attr), value


def test_codegen_refuses_interpreted_kernels() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lenalign.cli", "codegen"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "TRITON_INTERPRET" in result.stderr


def test_resident_warps_follow_the_register_file() -> None:
    # 64 registers x 32 lanes = 2048 per warp: 32 warps of registers, two 16-warp programs
    assert resident_warps(64, 16) == 32
    assert resident_warps(32, 16) == 64  # capped by the 64 warps a multiprocessor holds
    # 80 registers: 25 warps of registers, one whole 16-warp program
    assert resident_warps(80, 16) == 16
    # 158 registers round up to 160: 12 warps of registers, three 4-warp programs
    assert resident_warps(158, 4) == 12
    assert resident_warps(None, 4) is None
