#!/usr/bin/env bash
# Everything a lent GPU box is for, in one run, most needed first (a run cut short by a
# time limit keeps what came first):
#   1. the kernel tests on the GPU (compiled, not interpreted; tests/test_gpu.py goes past
#      2**31 logits): tests.log
#   2. `lenalign bench` (bf16, every vocabulary at 4k and 16k tokens, every contender
#      installed there): bench.*
#   3. benchmarks/linear_head.py, from hidden states against eager and TRL's fused head:
#      linear_head.log
#   4. benchmarks/tune.py, the (BLOCK_V, num_warps) sweep of the row kernels: tune.*
#   5. one case of the pytest-benchmark suite
#
#   benchmarks/gpu.sh RESULTS_DIR
#
# Run from anywhere in a checkout on a machine whose python3 (or $PYTHON) has torch and
# triton. Nothing is downloaded or built: the checkout is put on PYTHONPATH. RESULTS_DIR
# receives machine.txt, the logs, bench.json/bench.md/bench.png, tune.json/tune.md and,
# where pytest-benchmark is installed, pytest-benchmark.json. A step that fails does not stop the later ones; the exit status
# is that of the first step that failed.
set -euo pipefail

if [ $# -ne 1 ]; then
	echo "usage: $0 RESULTS_DIR" >&2
	exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
python=${PYTHON:-python3}
# a relative path would break once the script moves into the results folder
if [[ $python == */* ]]; then python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python"); fi

# the checkout imports as installed (lenalign/kernels is a link to kernels/): a lent box
# may have no setuptools new enough for an editable install, and no index to fetch one from
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
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
status=0
step() { # step NAME LOG COMMAND...: run, log, keep the first failure's status
	local name=$1 log=$2 started=$SECONDS code
	shift 2
	"$@" 2>&1 | tee "$out/$log"
	code=${PIPESTATUS[0]}
	echo "$name: exit status $code after $((SECONDS - started)) s" | tee -a "$out/$log"
	if [ "$status" -eq 0 ]; then status=$code; fi
}

# the tests that exercise the kernels; the trainer, study, bench and packaging tests run
# on CPU anyway, and the codegen test is what this box does for real
step "kernel tests" tests.log "$python" -m pytest -q -rs -p no:cacheprovider --rootdir "$repo" \
	"$repo/tests/test_gpu.py" "$repo/tests/test_gradcheck.py" "$repo/tests/test_accuracy.py" \
	"$repo/tests/test_edge_cases.py" "$repo/tests/test_errors.py" "$repo/tests/test_losses.py" \
	"$repo/tests/test_linear.py" "$repo/tests/bench/test_tune.py"
step "lenalign bench" bench.log "$python" -m lenalign.cli bench --device cuda --out "$out"
step "linear head" linear_head.log "$python" "$repo/benchmarks/linear_head.py"
step "tune" tune.log "$python" "$repo/benchmarks/tune.py" --out "$out"

if "$python" -c "import pytest_benchmark" 2>/dev/null; then
	# one case, 16k tokens of a Llama-3 vocabulary: the suite is lenalign bench's
	step "pytest-benchmark" pytest-benchmark.log "$python" -m pytest "$repo/benchmarks" \
		--benchmark-only -q -rs -p no:cacheprovider --rootdir "$repo" \
		--bench-shape 8x2048x128256 --benchmark-json "$out/pytest-benchmark.json"
else
	echo "pytest-benchmark is not installed: pytest suite skipped" | tee "$out/pytest-benchmark.log"
fi
echo "total ${SECONDS} s; results in $out"
exit "$status"
