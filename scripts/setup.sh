#!/usr/bin/env bash
# Installs libtorch (from the PyPI torch wheel) into .libtorch/ once; a second run does nothing.
# Usage: scripts/setup.sh            (libtorch and the gloo headers for CPU builds)
#        scripts/setup.sh nvcc       (also nvcc 13.0 into .nvcc/ and the NCCL headers into
#                                     .cuda-headers/, for `--features cuda`)
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

# The c10d shim (src/dist/shim.cpp) compiles against libtorch's ProcessGroupGloo.hpp, which
# includes gloo headers the wheel does not ship. They come from Debian's libgloo-dev, pinned by
# version and checksum; libtorch 2.11 links gloo 0.5.x and the shim's static_assert checks the
# headers' version. Only headers are used: gloo itself is inside libtorch_cpu.
GLOO_DEB="libgloo-dev_0.0~git20220518.5b14351-3_amd64.deb"
GLOO_SHA256=80529c9fd8af452faf489e686b94bf87075965c40673803810c4f41634b1e299
GSTAMP=".gloo/.stamp-0.0~git20220518.5b14351-3"
if [ ! -f "$GSTAMP" ] && [ -z "${GLOO_INCLUDE:-}" ]; then
  echo "setup: fetching the gloo headers ($GLOO_DEB) into .gloo" >&2
  rm -rf .gloo.tmp && mkdir -p .gloo.tmp
  "${PYTHON:-python3}" - ".gloo.tmp/$GLOO_DEB" "$GLOO_DEB" <<'PY'
import sys, urllib.request
out, name = sys.argv[1], sys.argv[2]
url = "http://deb.debian.org/debian/pool/main/g/gloo/" + name.replace("~", "%7E")
with urllib.request.urlopen(url, timeout=120) as r, open(out, "wb") as f:
    f.write(r.read())
PY
  echo "$GLOO_SHA256  .gloo.tmp/$GLOO_DEB" | sha256sum -c --quiet - || {
    echo "error: .gloo.tmp/$GLOO_DEB does not have the pinned SHA-256 $GLOO_SHA256" >&2; exit 1; }
  command -v dpkg-deb >/dev/null || {
    echo "error: dpkg-deb is needed to unpack $GLOO_DEB (or set GLOO_INCLUDE=/dir/with/gloo/)" >&2; exit 1; }
  dpkg-deb -x ".gloo.tmp/$GLOO_DEB" .gloo.tmp/root
  rm -rf .gloo && mkdir -p .gloo
  mv .gloo.tmp/root/usr/include .gloo/include
  rm -rf .gloo.tmp
  touch "$GSTAMP"
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
  # Headers for the shim's ProcessGroupNCCL (compiled, never linked against: libtorch_cuda
  # brings the libraries): NCCL at the version torch 2.11 requires, and the CUDA library
  # headers libtorch's ATen/cuda headers include, at the versions of torch's cuda-toolkit 13.0.2
  # pin. Only include/ is kept from each wheel.
  HEADERS="nvidia-nccl-cu13==2.28.9 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.1.0.3 \
nvidia-cusparse==12.6.3.3 nvidia-cusolver==12.0.4.66"
  CSTAMP=".cuda-headers/.stamp-$(echo "$HEADERS" | sha256sum | cut -c1-16)"
  if [ ! -f "$CSTAMP" ] && [ -z "${NCCL_INCLUDE:-}" ]; then
    need_pip "$HEADERS"
    echo "setup: fetching NCCL and CUDA library headers into .cuda-headers" >&2
    rm -rf .cuda-headers.tmp && mkdir -p .cuda-headers.tmp/wheels
    # shellcheck disable=SC2086
    "${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check --no-deps \
      -d .cuda-headers.tmp/wheels $HEADERS
    "${PYTHON:-python3}" - .cuda-headers.tmp <<'PY'
import glob, os, sys, zipfile
root = sys.argv[1]
for whl in glob.glob(os.path.join(root, "wheels", "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            # nvidia/<lib>/include/<header> -> include/<header>
            parts = name.split("/")
            if "include" in parts[:-1] and not name.endswith("/"):
                rel = parts[parts.index("include") + 1:]
                out = os.path.join(root, "include", *rel)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with z.open(name) as src, open(out, "wb") as dst:
                    dst.write(src.read())
PY
    rm -rf .cuda-headers.tmp/wheels .cuda-headers
    mv .cuda-headers.tmp .cuda-headers
    touch "$CSTAMP"
  fi
fi
