#!/usr/bin/env bash
# Builds the CUDA test and bench binaries here (no GPU needed) and packs them into .gpu/
# with a run.sh for a GPU machine.
#
# Usage: scripts/gpu.sh build      build with --features cuda, fill .gpu/
#        scripts/gpu.sh build-cpu  the same pack without CUDA into .gpu-cpu/ (a CUDA build links
#                                  libtorch_cuda, which a CPU machine lacks), for CI to run
#                                  `.gpu-cpu/gpu-check.sh --cpu`
#        (BRELU_GPU_PROFILE=release for an optimised host side; by default `build` uses the
#        `dev` profile of `make cuda-build` and `build-cpu` the `test` profile of `make test`,
#        so each reuses dependencies already built (optimised anyway) instead of building them
#        once more; the kernels are compiled by nvcc -O3 either way)
#        (then, on the GPU machine, from the repository root)  .gpu/run.sh [bench-filter]
#
# .gpu/ holds (executables stripped and xz-compressed, unpacked by gpu_unpack.py where they
# run): the stripped test executables (tests/it and the lib unit tests), the bench
# executable, the brelu CLI, the nvcc-built host harness (host_check), run.sh, and the GPU
# check (gpu-check.sh with its helpers; see that script). The binaries link
# libtorch dynamically; run.sh points LD_LIBRARY_PATH at the torch/lib of the machine's
# python3 (plus its nvidia/*/lib folders), so that machine needs `pip install torch` (2.11,
# CUDA 13 build) and an NVIDIA driver; nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-build}" in
build)
  pack=.gpu
  features=(--features cuda)
  default_profile=dev
  NVCC="$(scripts/nvcc-path.sh)"
  export NVCC
  echo "gpu.sh: building with NVCC=$NVCC" >&2
  ;;
build-cpu)
  pack=.gpu-cpu
  features=()
  default_profile=test
  ;;
*)
  echo "usage: scripts/gpu.sh build|build-cpu" >&2
  exit 2
  ;;
esac

json="$(mktemp)"
trap 'rm -f "$json"' EXIT
profile="${BRELU_GPU_PROFILE:-$default_profile}"
cargo test --profile "$profile" "${features[@]}" --no-run --message-format=json >"$json"
cargo bench --profile "$profile" "${features[@]}" --bench block_relu --no-run --message-format=json >>"$json"
# dev and test both build into target/debug.
outdir=$(case "$profile" in dev | test) echo debug ;; *) echo "$profile" ;; esac)

rm -rf "$pack"
mkdir -p "$pack/bin"
# Executables of test and bench targets, from cargo's JSON messages.
python3 - "$json" "$pack" <<'PY'
import json, os, shutil, sys
seen = set()
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    is_bench = "bench" in t["kind"]
    if not (m["profile"].get("test") or is_bench):
        continue
    name = "bench-" + t["name"] if is_bench else "test-" + t["kind"][0] + "-" + t["name"]
    if name in seen:
        continue
    seen.add(name)
    shutil.copy(m["executable"], os.path.join(sys.argv[2], "bin", name))
    print("gpu.sh: packed", name, file=sys.stderr)
PY
# The CLI and the GPU check (scripts/gpu-check.sh) with its helpers.
cargo build --profile "$profile" "${features[@]}" --bin brelu
cp target/"$outdir"/brelu "$pack/bin/brelu"
cp scripts/gpu-check.sh scripts/gpu_check.py scripts/bench_train_pytorch.py scripts/gpu_unpack.py "$pack/"
hc="$(ls -t target/"$outdir"/build/brelu-*/out/host_check 2>/dev/null | head -1)"
if [ -n "$hc" ]; then cp "$hc" "$pack/bin/host_check"; fi
strip "$pack"/bin/* 2>/dev/null || true
# Compressed (xz): the stripped executables are about 60 MiB, a third of that packed.
# gpu-check.sh and run.sh unpack them on the machine that runs them (gpu_unpack.py).
python3 - "$pack/bin" <<'PY'
import lzma, os, sys
d = sys.argv[1]
for name in sorted(os.listdir(d)):
    p = os.path.join(d, name)
    with open(p, "rb") as f, lzma.open(p + ".xz", "wb", preset=6) as g:
        g.write(f.read())
    os.remove(p)
PY

cat >"$pack/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the packed CUDA tests, then the GPU benches (criterion filter, default `gpu_`).
# Usage, from the repository root on the GPU machine: .gpu/run.sh [bench-filter]
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 "$here/gpu_unpack.py" || exit 1
torch="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')"
libs="$torch/lib"
for d in "$torch"/../nvidia/*/lib "$torch"/../nvidia/cu13/lib; do [ -d "$d" ] && libs="$libs:$d"; done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export BRELU_HOST_CHECK="$here/bin/host_check"
nvidia-smi -L || true
status=0
for t in "$here"/bin/test-*; do
  case "$t" in *.xz) continue ;; esac
  echo "=== $(basename "$t")"
  # CLI tests run the packed brelu (tests/it/common.rs reads BRELU_BIN).
  BRELU_BIN="$here/bin/brelu" "$t" --nocapture || status=1
done
echo "=== benches"
"$here"/bin/bench-block_relu --bench "${1:-gpu_}" || status=1
# The BENCHMARKS.md table (medians, GB/s, ratios to the copies, cache-hot and cold).
python3 scripts/bench_table.py target/criterion "${1:-gpu_}" || status=1
if [ -n "${OUT:-}" ]; then cp -r target/criterion "$OUT/criterion" 2>/dev/null || true; fi
exit $status
RUN
chmod +x "$pack/run.sh"
size=$(du -sm "$pack" | cut -f1)
# A lent machine takes 64 MiB in all; the pack keeps well below, so the tests can grow.
if [ "$size" -ge 48 ]; then echo "gpu.sh: error: $pack/ is ${size} MiB (at most 47: a lent machine takes 64 in all)" >&2; exit 1; fi
echo "gpu.sh: packed $pack/ (${size} MiB); on the GPU machine, from the repository root: .gpu/gpu-check.sh (or .gpu/run.sh for tests and benches only)" >&2
