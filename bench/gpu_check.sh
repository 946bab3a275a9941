#!/usr/bin/env bash
# Every GPU path of the project in one call, under 8 minutes on one H100.
#
# NEEDS A CUDA GPU (CI has none: the CPU-side parts, bench/gpu_check.py's step runner, parsers
# and table, are tested in tests/bench/test_gpu_check.py). From a clean checkout:
#
#     python -m venv .venv && .venv/bin/pip install -e '.[gpu,train,service]'
#     PATH=.venv/bin:$PATH bash bench/gpu_check.sh                # every step
#     bash bench/gpu_check.sh --only ort-cuda-vs-cpu,faiss-gpu-vs-cpu   # some steps
#     bash bench/gpu_check.sh --work /tmp/gc --only export,embed-cuda    # reusing a run's output
#
# Reads nothing outside the repository but ../shared/data/cifar10-jpeg.tar.gz (--data another
# copy). Steps, in order, each under its own time limit inside a 440 s budget (--budget): ONNX
# Runtime CUDA vs CPU on models/default (40 s), FAISS GPU vs CPU search (40 s), torchrun
# 1-process `byorl train` (50 s), NCCL DDP with SyncBatchNorm (40 s), `byorl train --max-steps
# 300` on CIFAR-10 (110 s), `byorl export` (30 s), one /embed through the CUDA provider (40 s),
# bench/bench_train.py on the paper config, eager vs compiled (170 s, or what is left). A step
# that fails or runs out of time is a FAIL row with its reason; the rest still run. The table
# is printed and written to results/gpu/gpu_check-<card>-<date>.md; exit 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA GPU here (nvidia-smi sees none); run it on a GPU machine" >&2
    exit 2
fi
exec "${PYTHON:-python}" bench/gpu_check.py run "$@"
