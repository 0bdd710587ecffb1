#!/usr/bin/env bash
# One-shot accelerator check: training speed (f32 / bf16), an epoch of the SCL
# paper config and of the cluster recipe, selection against 1M bank rows,
# clustering of 32,621 and 1M features. Writes gpu_check.json (or --out) and
# prints a table. --small: CI sizes on the CPU. Options: benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# Two processes share one accelerator (the cluster part runs beside the epoch
# part): neither may take jax's default 75% of its memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
