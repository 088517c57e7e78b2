#!/usr/bin/env bash
# Prints the absolute path of the nvcc that `scripts/setup.sh nvcc` installed from PyPI into
# .nvcc/ (the wheels unpack a normal CUDA tree under .nvcc/nvidia/cu13: bin/nvcc with its
# nvcc.profile, nvvm/bin/cicc, include/ with the crt headers, lib/ with libcudart_static.a,
# so nvcc finds everything relative to itself). Falls back to an nvcc on PATH.
# Usage: NVCC=$(scripts/nvcc-path.sh) cargo build --features cuda
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
for cand in "$root"/.nvcc/nvidia/cu13/bin/nvcc "$root"/.nvcc/nvidia/cuda_nvcc/bin/nvcc; do
  if [ -x "$cand" ]; then
    echo "$cand"
    exit 0
  fi
done
if command -v nvcc >/dev/null 2>&1; then
  command -v nvcc
  exit 0
fi
echo "error: no nvcc: run \`scripts/setup.sh nvcc\` (or \`make cuda-setup\`) to install it into .nvcc/, or put nvcc on PATH" >&2
exit 1
