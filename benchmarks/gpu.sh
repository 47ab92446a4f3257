#!/usr/bin/env bash
# The GPU suite on a lent GPU box: `lenalign bench` (bf16, every vocabulary at 4k and 16k
# tokens, every contender installed there) and one case of the pytest-benchmark suite.
#
#   benchmarks/gpu.sh RESULTS_DIR
#
# Run from anywhere in a checkout on a machine whose python3 (or $PYTHON) has torch and
# triton. Nothing is downloaded or built: the checkout is put on PYTHONPATH as the package
# lenalign. RESULTS_DIR receives bench.json, bench.md, bench.png, the logs and, where
# pytest-benchmark is installed, pytest-benchmark.json. Exits with the status of
# `lenalign bench`.
set -euo pipefail

if [ $# -ne 1 ]; then
	echo "usage: $0 RESULTS_DIR" >&2
	exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
python=${PYTHON:-python3}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# lenalign laid out as pyproject.toml maps it (lenalign.kernels is the top-level kernels/
# folder), from links in a scratch folder: a lent box may have no setuptools new enough
# for an editable install, and no index to fetch one from
mkdir "$scratch/lenalign"
ln -s "$repo"/lenalign/*.py "$scratch/lenalign/"
ln -s "$repo/kernels" "$scratch/lenalign/kernels"
export PYTHONPATH="$scratch${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import lenalign.kernels"; then
	echo "$0: lenalign does not import from $repo with $python" >&2
	exit 1
fi

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
	echo "$0: torch sees no CUDA device" >&2
	exit 1
fi
{
	command -v nvidia-smi >/dev/null && nvidia-smi
	"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$out/machine.txt" 2>&1 || true

# the results folder is the working directory, so nothing is written into the checkout
cd "$out"
set +e
SECONDS=0
"$python" -m lenalign.cli bench --device cuda --out "$out" 2>&1 | tee "$out/bench.log"
status=${PIPESTATUS[0]}
echo "lenalign bench: exit status $status after ${SECONDS} s" | tee -a "$out/bench.log"

if "$python" -c "import pytest_benchmark" 2>/dev/null; then
	# one case, 16k tokens of a Llama-3 vocabulary: the suite is lenalign bench's
	"$python" -m pytest "$repo/benchmarks" --benchmark-only -q -rs -p no:cacheprovider \
		--rootdir "$repo" --bench-shape 8x2048x128256 \
		--benchmark-json "$out/pytest-benchmark.json" 2>&1 | tee "$out/pytest-benchmark.log"
else
	echo "pytest-benchmark is not installed: pytest suite skipped" | tee "$out/pytest-benchmark.log"
fi
echo "total ${SECONDS} s; results in $out"
exit "$status"
