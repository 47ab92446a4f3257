"""The ``lenalign`` console command: one subcommand per wing, each wing owning its ``cli``."""

from __future__ import annotations

import importlib
import sys

# subcommand -> module whose ``main(argv)`` runs it; imported lazily so that
# ``lenalign bench`` does not pay for transformers and ``lenalign train`` not for matplotlib.
SUBCOMMANDS = {
    "bench": ("lenalign.bench.cli", "benchmark lenalign against eager PyTorch"),
    "train": ("lenalign.train.cli", "preference-train a causal LM through the fused loss"),
    "study": ("lenalign.study.cli", "length-versus-score study of sum and mean normalization"),
    "codegen": (
        "lenalign.bench.codegen",
        "compile the kernels for a GPU architecture, without one",
    ),
}


def _usage() -> str:
    lines = ["usage: lenalign {" + ",".join(SUBCOMMANDS) + "} [options]", ""]
    lines += [f"  {name:<8}{help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"lenalign: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
