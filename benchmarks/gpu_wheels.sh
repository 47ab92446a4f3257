#!/usr/bin/env bash
# Download the wheels that the optional contenders of `lenalign bench` (`liger`, `trl`) and
# of benchmarks/linear_head.py (`liger-flce`, `trl-fused-head`, `cce`) need on a lent GPU
# box that has no network: run this on a machine that reaches the package index, carry the
# folder to the box, and there
#
#   python3 -m pip install --no-index --no-deps --target SITE DIR/*.whl
#   PYTHONPATH=SITE benchmarks/gpu.sh RESULTS_DIR
#
#   benchmarks/gpu_wheels.sh [DIR]     (DIR defaults to .whl; prints the total size)
#
# The box's image (Python 3.12, x86-64, torch 2.11, triton 3.6, transformers 5.17,
# accelerate 1.15, huggingface_hub 1.33, numpy, pandas, pyarrow, fsspec, xxhash, requests,
# jinja2, psutil, peft, ...) already holds every other import-time dependency, so the list
# below is exactly what is missing there, each pinned, and nothing else: no torch, triton
# or transformers wheel, whose installs would replace the box's CUDA builds. All of them
# are pure-Python wheels, 2.6 MiB in all (multiprocess's is the CPython 3.12 one).
set -euo pipefail

dir=${1:-.whl}
python=${PYTHON:-python3}

wheels=(
	# liger_cross_entropy and liger_fused_linear_cross_entropy
	# (liger_kernel.transformers.functional): need only torch and triton at import time.
	# 0.8.5 is the newest release; it declares torch>=2.1.2, triton>=2.3.1 and reads
	# transformers only lazily (5.x is what it is tested with).
	liger-kernel==0.8.5
	# linear_cross_entropy (cut_cross_entropy, Apple's Cut Cross-Entropy): 25.1.1 is the
	# newest release, a pure-Python wheel whose only requirements are torch and triton
	# (transformers, accelerate, datasets, deepspeed, ... are extras it does not import).
	# At import it reads triton.testing (nvsmi, get_max_tensorcore_tflops, ...) and
	# triton.language.extra.libdevice, which every triton 3.x has.
	cut-cross-entropy==25.1.1
	# selective_log_softmax (trl.trainer.utils): 1.16.0 is the newest release. From 1.14
	# on, on a CUDA bf16/fp16/fp32 tensor it dispatches to TRL's own fused Triton kernel
	# (trl.kernels.logprob_entropy); up to 1.13 it was a pure-PyTorch log_softmax + gather
	# loop. It declares accelerate>=1.10.1, transformers>=4.56.2, datasets>=4.7.0. Its
	# fused LM head, trl.kernels.ChunkedLogProbFunction, imports trl.trainer.utils too.
	trl==1.16.0
	# trl.trainer.utils does `from datasets import IterableDataset` at module level, so
	# `datasets` is needed even though nothing of it is used. 5.2.0 is the newest release
	# and wants huggingface-hub>=1.31,<3 (the box has 1.33), pyarrow>=24, fsspec<=2026.9.0.
	datasets==5.2.0
	# datasets' own import-time dependencies that the box lacks: dill (datasets.config
	# reads its version through importlib.metadata, so it must be installed, not vendored)
	# and multiprocess, at the newest releases that datasets 5.2.0 allows
	# (dill<0.4.2, multiprocess<0.70.20).
	dill==0.4.1
	multiprocess==0.70.19
)

mkdir -p "$dir"
# --no-deps: the box already has the rest, and resolving them here would drag in torch's
# CUDA wheels (GiBs). The platform, version and implementation flags pick the wheel the
# box's CPython 3.12 on manylinux x86-64 installs (multiprocess ships one per Python
# version); --only-binary is required with them.
"$python" -m pip download --no-deps --only-binary=:all: \
	--python-version 3.12 --implementation cp --abi cp312 \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform any \
	--dest "$dir" "${wheels[@]}"

# the total of exactly the wheels named above, whatever else the folder already holds
total=0
for spec in "${wheels[@]}"; do
	name=${spec%%==*}
	version=${spec##*==}
	stem="${name//-/_}-${version}-"
	found=("$dir"/"$stem"*.whl)
	if [ ! -e "${found[0]}" ]; then
		echo "$0: no wheel for $spec in $dir" >&2
		exit 1
	fi
	size=$(stat -c %s "${found[0]}")
	total=$((total + size))
	printf '%10d  %s\n' "$size" "$(basename "${found[0]}")"
done
printf '%10d  total (%s MiB) in %s\n' "$total" "$(awk -v b="$total" 'BEGIN { printf "%.2f", b / 1048576 }')" "$dir"
