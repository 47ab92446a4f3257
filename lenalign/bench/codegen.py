"""``lenalign codegen``: compile the Triton kernels for NVIDIA GPUs on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not their compiled form:
a kernel that the interpreter accepts can still fail in Triton's code generation, or
compile to scalar loads or to register spills that cost bandwidth. This command runs the
real compiler, as far as machine code, for a chosen GPU architecture, with nothing but
Triton's own tool chain (ptxas and cuobjdump ship in its wheel): no driver, no GPU.

Each launch is the one the host code makes: the launchers of ``lenalign.kernels`` are
called on small CPU tensors of the case's dtype and vocabulary with Triton's
``JITFunction.run`` replaced by a recorder, and each recorded launch is specialized as
Triton's JIT would (pointers 16-byte aligned and integers divisible by 16 marked so,
integers equal to 1 made constants). The report gives, per kernel and case, the
registers per thread, the bytes spilled to local memory, its global loads by width and
the barriers in its machine code.

Needs the kernels compiled, not interpreted: run it with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lenalign.layout import accumulate_dtype

ARCHITECTURES = {"sm80": 80, "sm90": 90}
# per multiprocessor on both sm_80 (A100) and sm_90 (H100, H200)
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
# the vocabularies of the benchmark suite, and 50257 (GPT-2): a row stride that is not a
# multiple of 16 elements, where loads cannot be proven aligned
VOCABULARIES = (32000, 128256, 151936, 262144, 50257)
POINTER_TYPES = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.int64: "*i64",
}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as recorded from a launcher: the kernel and its arguments."""

    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict


@dataclass
class KernelBuild:
    """The compiled form of one launch for one architecture, and the cases that share it."""

    kernel: str
    arch: str
    dtypes: list[str]  # logits dtypes of the cases whose launch compiles to this build
    vocabularies: list[int]
    num_warps: int
    block: int
    registers: int | None  # per thread
    spill_bytes: int | None  # local memory per thread (register spills)
    shared_bytes: int  # shared memory the launch asks for (Triton's, dynamic)
    loads: str | None  # global loads in the machine code by width, "128 bit x2, 64 bit x1"
    barriers: int | None  # BAR.SYNC instructions in the machine code
    resident_warps: int | None  # warps per multiprocessor that the registers allow


def resident_warps(registers: int | None, num_warps: int) -> int | None:
    """Warps of whole programs that fit on one multiprocessor, as registers allow.

    Registers are allocated per warp in units of 256 (8 per thread); programs are placed
    whole, so a 16-warp program of 64 registers leaves room for exactly two.
    """
    if registers is None:
        return None
    per_warp = -(-registers * 32 // 256) * 256
    warps = min(REGISTERS_PER_SM // per_warp, MAX_WARPS_PER_SM)
    return warps // num_warps * num_warps


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Record, instead of running, every JIT kernel launched in the block.

    ``kernel[grid](...)`` calls the kernel's ``run``; replacing it on the class catches
    every kernel the launchers reach without naming the kernels, which are private to
    ``lenalign.kernels``.
    """
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append(Launch(kernel, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def specialize(value: object) -> tuple[str, object | None, bool]:
    """(signature type, constant or None, divisible by 16) of one argument, as the JIT does."""
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype], None, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        kind = "i32" if -(2**31) <= value < 2**31 else "i64"
        return kind, None, value % 16 == 0
    raise TypeError(f"cannot specialize a launch argument of type {type(value).__name__}")


@dataclass(frozen=True)
class Specialization:
    """What Triton compiles one launch as: signature types, constants, aligned arguments."""

    signature: dict
    constants: dict
    divisible: tuple[int, ...]  # indices of arguments marked divisible by 16
    options: dict

    def key(self) -> str:
        return repr((self.signature, self.constants, self.divisible, sorted(self.options.items())))


def specialize_launch(launch: Launch) -> Specialization:
    """The specialization Triton's JIT would compile a recorded launch as."""
    kernel = launch.kernel
    names = kernel.arg_names
    constexpr_names = {names[p.num] for p in kernel.params if p.is_constexpr}
    values = dict(zip(names, launch.args, strict=False))
    values.update({k: v for k, v in launch.kwargs.items() if k in names})
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    signature, constants, divisible = {}, {}, []
    for index, name in enumerate(names):
        if name in constexpr_names:
            signature[name] = "constexpr"
            constants[name] = values[name]
            continue
        kind, constant, is_divisible = specialize(values[name])
        signature[name] = kind
        if constant is not None:
            constants[name] = constant
        if is_divisible:
            divisible.append(index)
    return Specialization(signature, constants, tuple(divisible), options)


def compile_launch(launch: Launch, spec: Specialization, arch: int):
    """Compile one launch to machine code for sm_<arch>; returns Triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(index,): [["tt.divisibility", 16]] for index in spec.divisible}
    source = ASTSource(
        fn=launch.kernel, signature=spec.signature, constexprs=spec.constants, attrs=attrs
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec.options)


def cuobjdump() -> str | None:
    """Path of cuobjdump: Triton's own copy, else one on PATH, else None."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    return shutil.which("cuobjdump")


def machine_code_figures(cubin: bytes, tool: str | None) -> dict[str, int | str | None]:
    """Registers, spills, load widths and barriers read from a cubin."""
    figures: dict[str, int | str | None] = dict.fromkeys(
        ("registers", "spill_bytes", "loads", "barriers")
    )
    if tool is None:
        return figures
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run(
            [tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [tool, "--dump-sass", str(path)], capture_output=True, text=True, check=True
        ).stdout
    for key, field in (("registers", "REG"), ("spill_bytes", "LOCAL")):
        match = re.search(rf"\b{field}:(\d+)", usage)
        figures[key] = int(match.group(1)) if match else None
    # LDG.E is 32 bits wide; LDG.E.U16, .64 and .128 say their width
    widths: dict[int, int] = {}
    for suffix in re.findall(r"\bLDG\.E((?:\.[A-Z0-9]+)*)", sass):
        sizes = [
            int(part.lstrip("SU")) for part in suffix.split(".") if part.lstrip("SU").isdigit()
        ]
        width = sizes[0] if sizes else 32
        widths[width] = widths.get(width, 0) + 1
    figures["loads"] = ", ".join(f"{w} bit x{n}" for w, n in sorted(widths.items(), reverse=True))
    figures["barriers"] = len(re.findall(r"\bBAR\.SYNC\b", sass))
    return figures


def case_launches(dtype: torch.dtype, vocab: int) -> list[Launch]:
    """Record the forward, backward and segment launches of one (dtype, vocab) case."""
    from lenalign import kernels

    acc = accumulate_dtype(dtype)
    # three rows in one sequence: T = 3 so that no stride or size is the constant 1
    logits = torch.empty(1, 3, vocab, dtype=dtype)
    targets = torch.tensor([2, 1, -1])
    cu_seqlens = torch.tensor([0, 3])
    row_values = torch.empty(3, dtype=acc)
    with recording() as launches:
        kernels.row_logprob_forward(logits, targets, acc)
        kernels.row_logprob_backward(
            logits, targets, row_values, row_values, row_values, torch.empty_like(logits)
        )
        kernels.segment_reduce(row_values, targets, cu_seqlens)
    return launches


def build_report(dtypes: list[str], vocabularies: list[int], archs: list[str]) -> list[KernelBuild]:
    """Compile every distinct launch of every case for every architecture.

    Launches that specialize alike (the large vocabularies of one dtype; the segment
    reduction of every 16-bit and 32-bit case) are compiled once and listed once, with
    the cases they serve. Any compile failure propagates.
    """
    from lenalign import kernels

    if kernels.INTERPRETED:
        raise RuntimeError(
            "lenalign codegen needs TRITON_INTERPRET unset: the kernels are interpreted"
        )
    tool = cuobjdump()
    builds: dict[tuple[str, str, str], KernelBuild] = {}
    for arch in archs:
        for dtype_name in dtypes:
            for vocab in vocabularies:
                for launch in case_launches(DTYPES[dtype_name], vocab):
                    spec = specialize_launch(launch)
                    key = (arch, launch.kernel.__name__, spec.key())
                    if key in builds:
                        build = builds[key]
                        if dtype_name not in build.dtypes:
                            build.dtypes.append(dtype_name)
                        if vocab not in build.vocabularies:
                            build.vocabularies.append(vocab)
                        continue
                    compiled = compile_launch(launch, spec, ARCHITECTURES[arch])
                    figures = machine_code_figures(compiled.asm["cubin"], tool)
                    warps = compiled.metadata.num_warps
                    builds[key] = KernelBuild(
                        kernel=launch.kernel.__name__.strip("_"),
                        arch=arch,
                        dtypes=[dtype_name],
                        vocabularies=[vocab],
                        num_warps=warps,
                        shared_bytes=compiled.metadata.shared,
                        block=launch.kwargs.get("BLOCK_V", launch.kwargs.get("BLOCK_ROWS")),
                        resident_warps=resident_warps(figures["registers"], warps),
                        **figures,
                    )
    return list(builds.values())


def format_report(builds: list[KernelBuild]) -> str:
    """A Markdown table of the builds."""
    header = (
        "| kernel | arch | dtypes | V | warps | block | registers | spilled B | "
        "shared B | global loads | barriers | resident warps/SM |"
    )
    lines = [header, "|" + " --- |" * 12]

    def shown(value: int | None, unit: str = "") -> str:
        return "n/a" if value is None else f"{value}{unit}"

    for b in builds:
        lines.append(
            f"| {b.kernel} | {b.arch} | {', '.join(b.dtypes)} | "
            f"{', '.join(map(str, b.vocabularies))} | {b.num_warps} | {b.block} | "
            f"{shown(b.registers)} | {shown(b.spill_bytes)} | {shown(b.shared_bytes)} | "
            f"{shown(b.loads)} | {shown(b.barriers)} | {shown(b.resident_warps)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lenalign codegen", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHITECTURES), default=["sm90"])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--vocab", nargs="+", type=int, default=list(VOCABULARIES))
    parser.add_argument("--json", type=Path, help="also write the builds to this JSON file")
    args = parser.parse_args(argv)
    for vocab in args.vocab:
        if vocab < 1:
            parser.error(f"--vocab must be positive, got {vocab}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: codegen compiles the kernels, unset it")
    builds = build_report(args.dtype, args.vocab, args.arch)
    print(format_report(builds))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(b) for b in builds], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
