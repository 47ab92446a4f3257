#!/usr/bin/env bash
# Everything a lent GPU box is for, in one call that returns evidence whatever happens:
#
#   benchmarks/gpu.sh [--budget SECONDS] [--dry] RESULTS_DIR
#
# Steps, most needed first (estimates on one H200 in brackets, printed before starting):
#   1. kernel tests, compiled: past 2**31 logits, gradcheck, accuracy, token statistics,
#      the registered operators under torch.compile and opcheck on CUDA tensors   [180 s]
#   2. `lenalign bench` from logits, bf16 [16384, 128256]: lenalign (plain, in place)
#      against eager, torch.compile, Liger and TRL                                [60 s]
#   3. benchmarks/linear_head.py from hidden states: lenalign against eager, compile,
#      TRL's fused head, Liger's fused linear cross entropy, cut-cross-entropy   [100 s]
#   4. benchmarks/tune.py, the (BLOCK_V, num_warps) sweep of the row kernels      [60 s]
#
# The budget (--budget, else $LENALIGN_GPU_BUDGET, else 480 s; 170 s with --dry) bounds
# the whole run: a step starts only if its estimate fits in what is left, and is stopped
# (SIGINT, so pytest and the scripts print what they have) once it has used the slack
# and would eat into the later steps' estimates.
# $LENALIGN_GPU_ESTIMATES ("180 60 100 60") replaces the four estimates.
# After every step, ran or skipped, RESULTS_DIR/results.tar.gz is rewritten with all the
# files so far (machine.txt, the logs, bench.json/md/png, linear_head.json/md,
# tune.json/md, progress.txt) and RESULTS_DIR/progress.txt with one line per step: a
# run killed at any point keeps every finished step. Unpack: `tar xzf results.tar.gz`.
#
# --dry is the same plumbing on a CPU (CI runs it): tiny shapes, Triton's interpreter,
# the GPU-only contenders reported as skipped, in under 3 minutes on 2 cores.
#
# Run from anywhere in a checkout on a machine whose python3 (or $PYTHON) has torch and
# triton. Nothing is downloaded or built: the checkout is put on PYTHONPATH (it imports
# as installed: lenalign/kernels links kernels/). Optional contenders that the box lacks
# travel as wheels (benchmarks/gpu_wheels.sh; docs/benchmarks.md has the one command).
# The exit status is that of the first step that failed, 0 if none did.
set -uo pipefail

usage() {
	echo "usage: $0 [--budget SECONDS] [--dry] RESULTS_DIR" >&2
	exit 2
}
dry=0
budget=${LENALIGN_GPU_BUDGET:-}
while [ $# -gt 1 ]; do
	case $1 in
	--dry) dry=1 ;;
	--budget)
		[ $# -gt 2 ] || usage
		budget=$2
		shift
		;;
	*) usage ;;
	esac
	shift
done
[ $# -eq 1 ] || usage
if [ -z "$budget" ]; then budget=$((dry ? 170 : 480)); fi
[[ $budget =~ ^[0-9]+$ ]] || usage
read -r -a custom_estimates <<<"${LENALIGN_GPU_ESTIMATES:-}"
if [ -n "${LENALIGN_GPU_ESTIMATES:-}" ] &&
	[[ ! "${custom_estimates[*]}" =~ ^[0-9]+( [0-9]+){3}$ ]]; then
	echo "$0: LENALIGN_GPU_ESTIMATES must be 4 whole numbers of seconds" >&2
	exit 2
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" || exit 1
out=$(cd "$1" && pwd)
python=${PYTHON:-python3}
# a relative path would break once the script moves into the work folder
if [[ $python == */* ]]; then python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python"); fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# every line reaches the log as it is printed: a killed step loses nothing buffered
export PYTHONUNBUFFERED=1
if [ "$dry" -eq 1 ]; then export TRITON_INTERPRET=1; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 1 # nothing is written into the checkout
status=0

note() { # a line of progress.txt, also printed
	echo "[$(printf '%4d' "$SECONDS") s] $*" | tee -a "$work/progress.txt"
}
collect() { # the files so far into RESULTS_DIR, replaced whole
	cp "$work/progress.txt" "$out/progress.txt"
	# written aside, then renamed: a kill in the middle leaves the previous archive whole
	tar czf "$out/.results.tar.gz.partial" -C "$work" . &&
		mv "$out/.results.tar.gz.partial" "$out/results.tar.gz"
}
step() { # step NAME LOG ESTIMATE LATER COMMAND...: LATER, the later steps' estimates
	local name=$1 log=$2 estimate=$3 later=$4 started=$SECONDS code left cap
	shift 4
	left=$((budget - SECONDS))
	if [ "$left" -lt "$estimate" ]; then
		note "$name: skipped: ${left} s of the ${budget} s budget left, it needs about ${estimate} s"
		collect
		return
	fi
	# a step may overrun its estimate into the slack, not into the later steps' estimates
	cap=$((left - later > estimate ? left - later : estimate))
	note "$name: started, about ${estimate} s, stopped after ${cap} s, ${left} s left"
	timeout --signal=INT --kill-after=20 "$cap" "$@" 2>&1 | tee "$work/$log"
	code=${PIPESTATUS[0]}
	if [ "$code" -eq 124 ]; then
		note "$name: stopped at its share of the budget after $((SECONDS - started)) s (exit status 124)"
	else
		note "$name: exit status $code after $((SECONDS - started)) s"
	fi
	if [ "$status" -eq 0 ]; then status=$code; fi
	collect
}

{
	command -v nvidia-smi >/dev/null && nvidia-smi
	"$python" - <<'PROBE'
import sys

import torch
import triton

import lenalign.bench
import lenalign.kernels

print("torch", torch.__version__, "triton", triton.__version__, "python", sys.version.split()[0])
print("lenalign from", lenalign.__file__, "; CUDA device:", torch.cuda.is_available())
sys.exit(0 if torch.cuda.is_available() else 3)
PROBE
} >"$work/machine.txt" 2>&1
case $? in
0) ;;
3)
	if [ "$dry" -eq 0 ]; then
		note "setup: torch sees no CUDA device (--dry runs the plumbing on a CPU)"
		collect
		exit 1
	fi
	;;
*)
	note "setup: lenalign does not import from $repo with $python (machine.txt says why)"
	collect
	exit 1
	;;
esac
# the budget counts from here: the set-up above (imports, nvidia-smi) takes a few seconds
SECONDS=0

# --durations: this one run also says where the kernel tests' time went
pytest_args=(-q -rs -p no:cacheprovider --durations=25 --rootdir "$repo")
# a hung test fails alone instead of eating the budget
if "$python" -c "import pytest_timeout" 2>/dev/null; then pytest_args+=(--timeout 120); fi
if [ "$dry" -eq 1 ]; then
	kernel_tests=(tests/test_gpu.py tests/test_edge_cases.py)
	bench_args=(--device cpu --shape 2x16x64 --repeats 1)
	head_args=(--dry)
	tune_args=(--rows 3 --vocab 300 --blocks 128 --warps 1)
	estimates=(20 30 20 15)
else
	kernel_tests=(tests/test_gpu.py tests/test_gradcheck.py tests/test_accuracy.py
		tests/test_token_stats.py tests/test_compile.py tests/test_operators.py
		tests/test_edge_cases.py tests/test_errors.py tests/test_losses.py tests/test_linear.py
		tests/bench/test_tune.py)
	bench_args=(--device cuda --shape 8x2048x128256)
	head_args=()
	tune_args=()
	estimates=(180 60 100 60)
fi
# a box slower or faster than the one the estimates come from can scale the plan
if [ -n "${LENALIGN_GPU_ESTIMATES:-}" ]; then estimates=("${custom_estimates[@]}"); fi
planned=$((estimates[0] + estimates[1] + estimates[2] + estimates[3]))
note "plan: kernel tests ${estimates[0]} s, bench ${estimates[1]} s," \
	"linear head ${estimates[2]} s, tune ${estimates[3]} s: ${planned} s of a ${budget} s" \
	"budget$([ "$dry" -eq 1 ] && echo ' (dry run)')"
collect

step "kernel tests" tests.log "${estimates[0]}" $((estimates[1] + estimates[2] + estimates[3])) \
	"$python" -m pytest "${pytest_args[@]}" "${kernel_tests[@]/#/$repo/}"
step "lenalign bench" bench.log "${estimates[1]}" $((estimates[2] + estimates[3])) \
	"$python" -m lenalign.cli bench "${bench_args[@]}" --out "$work"
step "linear head" linear_head.log "${estimates[2]}" "${estimates[3]}" \
	"$python" "$repo/benchmarks/linear_head.py" "${head_args[@]}" --out "$work"
step "tune" tune.log "${estimates[3]}" 0 \
	"$python" "$repo/benchmarks/tune.py" "${tune_args[@]}" --out "$work"
note "done: exit status $status; results in $out/results.tar.gz"
collect
exit "$status"
