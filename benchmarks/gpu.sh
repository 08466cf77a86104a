#!/usr/bin/env bash
# GPU benchmarks for an offline CUDA machine that brings its own torch: installs and downloads nothing.
# Training throughput and MFU of the GPT-2-124M-shaped model (bf16 autocast, fused SDPA, eager and
# torch.compile) beside the measured and the datasheet bf16 matmul peak; see benchmarks/gpu_train.py. Then
# inference: decode vs HF, continuous batching vs HF static batches, speculative ceiling (benchmarks/gpu_infer.py).
# Prints "no CUDA device" and exits 0 where there is none. Results: $OUT/gpu_results.json (else ./).
#
#     bash benchmarks/gpu.sh [--steps 30] [--seconds 25] [--no-compile]     # PYTHON=... picks the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python || command -v python3)}"
"$PY" benchmarks/gpu_train.py "$@" || echo "gpu_train.py failed: $?"
exec "$PY" benchmarks/gpu_infer.py
