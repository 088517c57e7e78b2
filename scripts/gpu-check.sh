#!/usr/bin/env bash
# Checks brelu's CUDA paths on a lent GPU machine in one go, each step under its own time
# limit, compared against an independent result, with one PASS/FAIL line per step, a JSON
# report and a table. `--cpu` runs the same steps on the CPU, smaller (CI runs that mode so
# this script cannot rot between GPU loans).
#
# Usage:  make gpu-check                     (here: build with --features cuda, pack .gpu/)
#         .gpu/gpu-check.sh [--out DIR]      (on the GPU machine, from the repository root)
#         make gpu-check-cpu                 (a CPU build packed into .gpu-cpu/, then
#                                            .gpu-cpu/gpu-check.sh --cpu; CI runs it)
# --bin: where brelu, test-test-it (the test binary) and bench-block_relu are (default: the
# bin/ beside this script, as `make gpu-check` packs it). --out: report folder (default $OUT, else
# gpu-check-out). The GPU machine needs python3 with torch 2.11 (its lib folder is put on
# LD_LIBRARY_PATH) and a driver; nothing from the network.
#
# Steps: facts (card or CPU); kernels (CUDA/CPU block-ReLU kernels against the framework-ops
# reference, then the block-ReLU and simulation benches); distortion-exact (ResNet18-CIFAR on
# the device, timed, with its effective TFLOP/s, and its tables against the CPU's);
# first-order (device against CPU); resnet50 (extraction at 224 on two late sites, timed, and
# against the CPU); train (the loss falls, the first interval agrees with the CPU's; images/s
# next to PyTorch eager when PyTorch is importable); deeplab (DeepLabV3-MobileNetV2
# forward/backward at 512, against the CPU); finetune (spec + distillation: the loss falls and
# agrees with the CPU's). Not yet: bf16 and NCCL (they wait for the scale-out work, issue 17).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mode=gpu
bin=""
out="${OUT:-$PWD/gpu-check-out}"
while [ $# -gt 0 ]; do
  case "$1" in
  --cpu) mode=cpu ;;
  --bin) bin="$2"; shift ;;
  --out) out="$2"; shift ;;
  -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$bin" ] || bin="$here/bin"
# The pack's executables travel xz-compressed (scripts/gpu.sh); unpack them once.
if ls "$bin"/*.xz >/dev/null 2>&1; then
  python3 "$here/gpu_unpack.py" "$bin" || { echo "gpu-check: cannot unpack $bin/*.xz" >&2; exit 2; }
fi
helper="$here/gpu_check.py"
pyref="$here/bench_train_pytorch.py"
it="$bin/test-test-it"
bench="$bin/bench-block_relu"
for f in "$bin/brelu" "$it" "$bench" "$helper" "$pyref"; do
  [ -e "$f" ] || { echo "gpu-check: missing $f (run \`make gpu-check\` and use .gpu/gpu-check.sh, or pass --bin)" >&2; exit 2; }
done

if [ "$mode" = gpu ]; then
  torch="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')" || {
    echo "gpu-check: python3 cannot import torch (needed for its CUDA libraries)" >&2; exit 2; }
  libs="$torch/lib"
  for d in "$torch"/../nvidia/*/lib "$torch"/../nvidia/cu13/lib; do [ -d "$d" ] && libs="$libs:$d"; done
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  dev=cuda:0
else
  dev=cpu
fi

# A folder of an earlier check is reused; anything else is left alone.
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -e "$out/steps.jsonl" ]; then
  echo "gpu-check: $out exists and is not a gpu-check report folder; pick another --out" >&2
  exit 2
fi
rm -rf "$out/work" "$out"/*.log "$out/steps.jsonl" "$out/report.json" "$out/table.md" "$out/facts.json"
mkdir -p "$out/work"
w="$out/work"
steps="$out/steps.jsonl"
: >"$steps"
failed=0

# step NAME LIMIT_S FUNCTION: runs FUNCTION under a time limit; its last stdout line is the
# step's figures (JSON); a non-zero exit or a timeout is a failure.
step() {
  local name=$1 limit=$2 fn=$3 t0 rc figures
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" bash -c "$(declare -f "$fn" run reference timed_extract); $fn" >"$out/$name.log" 2>&1
  rc=$?
  figures=$(grep '^{' "$out/$name.log" | tail -1)
  [ -n "$figures" ] || figures='{}'
  python3 - "$name" "$rc" "$t0" "$figures" "$limit" >>"$steps" <<'PY'
import json, sys, time
name, rc, t0, fig, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
fig = json.loads(fig)
if rc in (124, 137):
    fig["error"] = f"timed out after {limit} s"
print(json.dumps({"name": name, "pass": rc == 0, "rc": rc, "seconds": time.time() - t0, "figures": fig}))
PY
  if [ $rc -eq 0 ]; then echo "PASS $name"; else echo "FAIL $name (rc $rc, log: $out/$name.log)"; tail -5 "$out/$name.log" | sed 's/^/    /'; failed=1; fi
}
export bin it bench helper pyref dev mode w device
# run: echoes a command, runs it and stops the step (exit) when it fails.
run() { echo "+ $*" >&2; "$@" || exit 1; }

# ---- facts ----
if [ "$mode" = gpu ]; then
  device=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
else
  device="$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(nproc) cores"
fi
python3 -c 'import json,sys;print(json.dumps({"device":sys.argv[1],"mode":sys.argv[2],"isa":sys.argv[3]}))' \
  "$device" "$mode" "$(grep -o -m1 'avx512f' /proc/cpuinfo || echo avx2-or-less)" >"$out/facts.json"
echo "gpu-check ($mode) on $device; figures in $out"

# Data (synthetic CIFAR-100, learnable), configurations and shared weights.
python3 "$helper" cifar "$w/cifar-100-binary" 512 128 >/dev/null
if [ "$mode" = gpu ]; then iters=20 every=5 bs=64 samples=64 sites=layer1_0_1,layer2_0_1,layer3_0_1,layer4_0_1; else iters=12 every=4 bs=16 samples=2 sites=layer4_0_1; fi
export iters every bs samples sites
cat >"$w/r18.toml" <<EOF
model = "resnet18-cifar"
num_classes = 100
input = [3, 32, 32]
iterations = $iters
checkpoint_every = $every
batch_size = $bs
eval_batch_size = 128
seed = 0

[dataset]
kind = "cifar100"
path = "$w/cifar-100-binary"

[optimizer]
lr = 0.02
momentum = 0.9
weight_decay = 5e-4

[schedule]
kind = "step"
milestones = []
gamma = 0.1
EOF
sed -e 's/^lr = 0.02/lr = 0.005/' "$w/r18.toml" >"$w/r18-ft.toml"
printf '\n[distill]\nalpha = 0.5\ntemperature = 2.0\n' >>"$w/r18-ft.toml"

python3 "$helper" images "$w" >/dev/null
# ResNet50 at 224 (1000-way, on 10 synthetic class folders) and DeepLabV3-MobileNetV2 at 512 (ADE20K).
cat >"$w/r50.toml" <<EOF
model = "resnet50"
num_classes = 1000
input = [3, 224, 224]
iterations = 1
checkpoint_every = 1
batch_size = 2
eval_batch_size = 10
seed = 0

[dataset]
kind = "imagenet"
path = "$w/imagenet"

[optimizer]
lr = 0.01
momentum = 0.9
weight_decay = 1e-4

[schedule]
kind = "step"
milestones = []
gamma = 0.1
EOF
cat >"$w/mnv2.toml" <<EOF
model = "deeplabv3-mobilenetv2"
num_classes = 150
input = [3, 512, 512]
iterations = 2
checkpoint_every = 1
batch_size = 2
eval_batch_size = 1
seed = 0

[dataset]
kind = "ade20k"
path = "$w/ade"
test_scale = [512, 512]
inference = "whole"

[optimizer]
lr = 0.01
momentum = 0.9
weight_decay = 5e-4

[schedule]
kind = "poly"
power = 0.9
min_lr = 1e-4
EOF
if [ "$mode" = gpu ]; then r50_samples=16 r50_sites=layer4_2_1,layer4_2_2; else r50_samples=1 r50_sites=layer4_2_2; fi
# Tolerances of the comparisons with the reference side. D differences two float32 forward
# passes, so its noise does not shrink with D (see tests/it/segmentation_models.rs): tables
# get a relative bound plus a floor at the site's largest D. On the GPU, cuDNN's TF32
# convolutions (libtorch's default) round to 10 mantissa bits.
if [ "$mode" = gpu ]; then tab_rtol=2e-2 tab_floor=1e-3 loss_rtol=2e-2; else tab_rtol=2e-3 tab_floor=1e-4 loss_rtol=1e-3; fi
export r50_samples r50_sites tab_rtol tab_floor loss_rtol

# The reference side of a comparison: the CPU against the GPU; in CPU mode, one thread
# against all (another summation order of every reduction).
reference() {
  if [ "$mode" = gpu ]; then run "$bin/brelu" "$@"; else run env OMP_NUM_THREADS=1 "$bin/brelu" "$@"; fi
}
# timed_extract DIR ARGS...: an exact extraction into DIR on the device; prints its speed figures.
timed_extract() {
  local d=$1 t0 t1
  shift
  t0=$(date +%s.%N)
  run "$bin/brelu" distortion extract --estimator exact "$@" --devices "$dev" -o "$d" >&2
  t1=$(date +%s.%N)
  python3 "$helper" speed "$d" "$(python3 -c "print($t1 - $t0)")" "$device"
}

kernels() {
  # The packed test binary: block-ReLU kernels (CPU, and CUDA when a GPU is present) against
  # the framework-ops reference, bit for bit where the sums are exact; then their benches.
  "$it" block_relu:: --test-threads=2 --nocapture >"$w/kernels.txt" 2>&1
  rc=$?
  cat "$w/kernels.txt" >&2
  [ $rc -eq 0 ] && grep -q '^test result: ok' "$w/kernels.txt" || exit 1
  # On the GPU the CUDA tests must have run, not skipped themselves.
  if [ "$mode" = gpu ] && grep -q 'skipped: no CUDA device' "$w/kernels.txt"; then
    echo "the CUDA kernel tests skipped themselves: libtorch sees no CUDA device" >&2
    exit 1
  fi
  n=$("$it" block_relu:: --list 2>/dev/null | grep -c ': test$')
  if [ "$mode" = gpu ]; then f=gpu_; q=(); else f=cpu_simulate; q=(--warm-up-time 0.3 --measurement-time 1); fi
  run "$bench" --bench "$f" "${q[@]}" >"$w/bench.txt" 2>&1
  cat "$w/bench.txt" >&2
  b=$(python3 "$helper" criterion "$w/bench.txt") || { echo "$b"; exit 1; }
  python3 "$helper" merge "$b" "{\"tests\": $n}"
}
distortion_exact() {
  # One SGD step on the CPU: the weights every later step starts from (identical on every
  # device, real batch-norm statistics).
  run "$bin/brelu" train --config "$w/r18.toml" --iterations 1 --output "$w/w0" >&2
  # Timed: the device extraction at full size.
  sp=$(timed_extract "$w/ex-timed" --data "$w/r18.toml" --weights "$w/w0/checkpoint.safetensors" \
    --samples "$samples" --sites "$sites") || exit 1
  # Equality: one late site on 2 samples, device against CPU (CPU mode: stacked copies against
  # one perturbation per forward pass, a different code path).
  if [ "$mode" = gpu ]; then a=(--devices "$dev"); b=(--devices cpu); else a=(--stack 8 --batch 2); b=(--stack 1 --batch 1); fi
  common=(distortion extract --estimator exact --data "$w/r18.toml" --weights "$w/w0/checkpoint.safetensors" --samples 2 --sites layer4_0_1)
  run "$bin/brelu" "${common[@]}" "${a[@]}" -o "$w/ex-a" >&2
  run "$bin/brelu" "${common[@]}" "${b[@]}" -o "$w/ex-b" >&2
  cmp=$(python3 "$helper" tables "$w/ex-a" "$w/ex-b" "$tab_rtol" "$tab_floor") || { echo "$cmp"; exit 1; }
  python3 "$helper" merge "$cmp" "$sp"
}
first_order() {
  if [ "$mode" = gpu ]; then a=(--devices "$dev"); b=(--devices cpu); else a=(--batch 2); b=(--batch 1); fi
  # A full probe basis (one per logit): no random probes, so both sides compute the same sum.
  common=(distortion extract --estimator first-order --probes 100 --data "$w/r18.toml"
    --weights "$w/w0/checkpoint.safetensors" --samples 4 --sites "$sites")
  run "$bin/brelu" "${common[@]}" "${a[@]}" -o "$w/fo-a" >&2
  run "$bin/brelu" "${common[@]}" "${b[@]}" -o "$w/fo-b" >&2
  python3 "$helper" tables "$w/fo-a" "$w/fo-b" "$tab_rtol" "$tab_floor"
}
resnet50() {
  # One SGD step on the CPU gives the weights; then a timed extraction of two late sites on the
  # device and one site against the CPU (CPU mode: stacked against single perturbations).
  run "$bin/brelu" train --config "$w/r50.toml" --output "$w/w50" >&2
  sp=$(timed_extract "$w/ex50-timed" --data "$w/r50.toml" --weights "$w/w50/checkpoint.safetensors" \
    --samples "$r50_samples" --batch 8 --sites "$r50_sites") || exit 1
  if [ "$mode" = gpu ]; then a=(--devices "$dev"); b=(--devices cpu); else a=(--stack 8); b=(--stack 1); fi
  common=(distortion extract --estimator exact --data "$w/r50.toml" --weights "$w/w50/checkpoint.safetensors" --samples 1 --sites layer4_2_2)
  run "$bin/brelu" "${common[@]}" "${a[@]}" -o "$w/ex50-a" >&2
  run "$bin/brelu" "${common[@]}" "${b[@]}" -o "$w/ex50-b" >&2
  cmp=$(python3 "$helper" tables "$w/ex50-a" "$w/ex50-b" "$tab_rtol" "$tab_floor") || { echo "$cmp"; exit 1; }
  python3 "$helper" merge "$cmp" "$sp"
}
deeplab() {
  # Forward and backward of DeepLabV3-MobileNetV2 at 512x512 (2 SGD steps of 2 crops) on the
  # device; the first step's loss against the reference side's.
  run "$bin/brelu" train --config "$w/mnv2.toml" --device "$dev" --output "$w/mnv2" >&2
  reference train --config "$w/mnv2.toml" --iterations 1 --output "$w/mnv2-ref" >&2
  python3 "$helper" losses "$w/mnv2" "$w/mnv2-ref" "$loss_rtol"
}
train_step() {
  # The device run learns; its first interval agrees with the reference side's (same
  # initialisation, same batches).
  run "$bin/brelu" train --config "$w/r18.toml" --device "$dev" --output "$w/train" >&2
  reference train --config "$w/r18.toml" --iterations "$every" --output "$w/train-ref" >&2
  fig=$(python3 "$helper" losses "$w/train" "$w/train-ref" "$loss_rtol" --min-drop 0.1) || { echo "$fig"; exit 1; }
  eager='{"images_per_s": null}'
  if python3 -c 'import torch' 2>/dev/null; then
    d=cpu; [ "$mode" = gpu ] && d=cuda
    eager=$(python3 "$pyref" --only resnet18-cifar --batch "$bs" --steps 5 --device "$d" | head -1) || exit 1
  fi
  e=$(python3 -c 'import json,sys;print(json.dumps({"pytorch_eager_images_per_s":json.loads(sys.argv[1])["images_per_s"]}))' "$eager")
  python3 "$helper" merge "$fig" "$e"
}
ddp_step() {
  # The data-parallel path on one device (a world of one kept as a group: NCCL on the GPU, Gloo
  # on the CPU): DDP's Reducer with bf16 gradient compression. It trains, at most one host
  # synchronisation per optimizer step.
  sed -e "s/^iterations = .*/iterations = $every/" "$w/r18.toml" >"$w/r18-ddp.toml"
  export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 BRELU_DIST_SINGLE=1
  export MASTER_PORT=$((20000 + RANDOM % 20000))
  run "$bin/brelu" train --config "$w/r18-ddp.toml" --device "$dev" --grad-compress bf16 \
    --output "$w/ddp" >&2
  python3 "$helper" syncs "$w/ddp" "$every"
}
finetune() {
  run "$bin/brelu" spec uniform --model resnet18-cifar --patch 2x2 -o "$w/spec.json" >&2
  ft=(finetune --config "$w/r18-ft.toml" --weights "$w/train/checkpoint.safetensors" --spec "$w/spec.json")
  run "$bin/brelu" "${ft[@]}" --device "$dev" --output "$w/ft" >&2
  # It learns, and its first interval agrees with the reference side's.
  reference "${ft[@]}" --iterations "$every" --output "$w/ft-ref" >&2
  python3 "$helper" losses "$w/ft" "$w/ft-ref" "$loss_rtol" --min-drop 0
}

if [ "$mode" = gpu ]; then big=600; else big=900; fi
step kernels 300 kernels
step distortion-exact $big distortion_exact
step first-order 300 first_order
step resnet50 $big resnet50
step train $big train_step
step deeplab 600 deeplab
step finetune 300 finetune
step ddp 300 ddp_step
python3 "$helper" report "$out" "$mode" | tee "$out/table.md"
exit $failed
