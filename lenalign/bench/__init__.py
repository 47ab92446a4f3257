"""The bench wing: lenalign measured against what trainers run today, and its compiled code.

Two commands live here. ``lenalign bench`` (``cli``) times and measures the peak memory
of lenalign's per-sequence log-likelihoods against eager PyTorch, torch.compile, Liger
and TRL on a preference batch, every result checked against eager before it is timed.
``lenalign codegen`` (``codegen``) compiles the Triton kernels for NVIDIA GPU
architectures on a machine without a GPU and reads registers, spills and load widths
from the machine code. ``import lenalign`` does not import this wing.

Modules: ``workload`` (a case's shape and preference batch), ``contenders`` (the
implementations compared), ``probes`` (clock, peak memory, copy bandwidth),
``machine`` (the machine a figure comes from), ``case`` (check and measure one case, in
the worker process), ``report`` (table, JSON, Markdown, chart), ``cli`` and ``codegen``
(the two commands).

Public names, re-exported here for the pytest-benchmark suite and the scripts in
benchmarks/: the case and its batch (``CaseSpec``, ``Workload``, ``make_workload``,
``MODES``, ``FORWARD``, ``FORWARD_BACKWARD``), the contenders (``Contender``,
``CONTENDERS``), checking and running a case (``RunOptions``, ``Reference``,
``eager_reference``, ``make_step``, ``check``, ``run_case``), the instruments
(``Clock``, ``synchronize``, ``copy_bandwidth``, ``peak_memory_probe``,
``HostPeakMemory``, ``CudaPeakMemory``, ``machine_description``), the command's
cases (``default_shapes``, ``shape_parser``, ``parse_shape``, ``DEFAULT_REPEATS``) and
its strict-JSON writer (``write_json``).
``lenalign.bench.codegen`` keeps its own names.
"""

from .case import Reference, RunOptions, check, eager_reference, make_step, run_case
from .cli import DEFAULT_REPEATS, default_shapes, parse_shape, shape_parser
from .contenders import CONTENDERS, Contender
from .machine import machine_description
from .probes import (
    Clock,
    CudaPeakMemory,
    HostPeakMemory,
    copy_bandwidth,
    peak_memory_probe,
    synchronize,
)
from .report import write_json
from .workload import FORWARD, FORWARD_BACKWARD, MODES, CaseSpec, Workload, make_workload

__all__ = [
    "CONTENDERS",
    "DEFAULT_REPEATS",
    "FORWARD",
    "FORWARD_BACKWARD",
    "MODES",
    "CaseSpec",
    "Clock",
    "Contender",
    "CudaPeakMemory",
    "HostPeakMemory",
    "Reference",
    "RunOptions",
    "Workload",
    "check",
    "copy_bandwidth",
    "default_shapes",
    "eager_reference",
    "machine_description",
    "make_step",
    "make_workload",
    "parse_shape",
    "peak_memory_probe",
    "run_case",
    "shape_parser",
    "synchronize",
    "write_json",
]
