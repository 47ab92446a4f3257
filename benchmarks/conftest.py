"""Fixtures of the pytest-benchmark suite: the cases of ``lenalign bench`` on this device.

Run with ``pytest benchmarks/ --benchmark-only``. The cases are those that ``lenalign
bench`` runs without arguments (the GPU suite on a GPU, the quick fp32 pair on CPU), or
those given with ``--bench-shape BxTxV``; each benchmark reuses the pieces of ``lenalign
bench`` (workload, eager reference, check, memory probe), and pytest-benchmark times it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch

from lenalign.bench import (
    CaseSpec,
    CudaPeakMemory,
    HostPeakMemory,
    Reference,
    Workload,
    default_shapes,
    eager_reference,
    make_workload,
    parse_shape,
    peak_memory_probe,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = "bfloat16" if DEVICE.type == "cuda" else "float32"

# dynamo warns at each graph break of the reference's argument checks; they are expected
torch._logging.set_logs(dynamo=logging.ERROR)


@dataclass
class PreparedCase:
    """A case's inputs and eager reference, built once per session and shared."""

    spec: CaseSpec
    workload: Workload
    reference: Reference
    probe: HostPeakMemory | CudaPeakMemory


def pytest_configure(config: pytest.Config) -> None:
    # raised inside torch by torch.compile itself, once per compiled graph: not ours to fix
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-shape",
        action="append",
        default=[],
        type=parse_shape,
        metavar="BxTxV",
        help="a case to benchmark, repeatable (default: the cases of lenalign bench)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        shapes = metafunc.config.getoption("bench_shape") or default_shapes(DEVICE.type, False)
        ids = ["x".join(map(str, shape)) for shape in shapes]
        metafunc.parametrize("case", shapes, ids=ids, indirect=True, scope="session")


@pytest.fixture(scope="session")
def case(request: pytest.FixtureRequest) -> PreparedCase:
    spec = CaseSpec(*request.param, dtype=DTYPE, device=DEVICE.type)
    workload = make_workload(spec)
    return PreparedCase(spec, workload, eager_reference(workload), peak_memory_probe(DEVICE))
