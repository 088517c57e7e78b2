#!/usr/bin/env bash
# Installs libtorch (from the PyPI torch wheel) into .libtorch/ once; a second run does nothing.
# Usage: scripts/setup.sh            (libtorch for CPU builds)
#        scripts/setup.sh nvcc       (also nvcc 13.0 into .nvcc/, for `--features cuda`)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
CUDA_RT="nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85"
STAMP=".libtorch/.stamp-torch-${TORCH_VERSION}"

need_pip() {
  if ! command -v "${PYTHON:-python3}" >/dev/null 2>&1 || ! "${PYTHON:-python3}" -m pip --version >/dev/null 2>&1; then
    echo "error: brelu needs Python 3 with pip to fetch libtorch from PyPI ($1)." >&2
    echo "       On Debian: apt-get install python3-pip; or set PYTHON=/path/to/python3." >&2
    echo "       Alternatively unpack libtorch ${TORCH_VERSION} yourself and set LIBTORCH=/path/to/libtorch." >&2
    exit 1
  fi
}

if [ ! -f "$STAMP" ]; then
  need_pip "torch==${TORCH_VERSION}"
  echo "setup: installing torch==${TORCH_VERSION} (libtorch, ~1.2 GB) into .libtorch/py" >&2
  rm -rf .libtorch/py.tmp
  # --no-deps: only libtorch and the two small CUDA libraries libtorch_cpu links against.
  "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target .libtorch/py.tmp "torch==${TORCH_VERSION}" $CUDA_RT
  rm -rf .libtorch/py
  mv .libtorch/py.tmp .libtorch/py
  touch "$STAMP"
fi

if [ "${1:-}" = "nvcc" ]; then
  NSTAMP=".nvcc/.stamp-13.0.88"
  if [ ! -f "$NSTAMP" ]; then
    need_pip "nvidia-cuda-nvcc"
    echo "setup: installing nvcc 13.0.88 into .nvcc" >&2
    rm -rf .nvcc
    "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --no-deps --target .nvcc \
      "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
      "nvidia-cuda-runtime==13.0.96"
    touch "$NSTAMP"
  fi
fi
