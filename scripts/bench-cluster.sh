#!/usr/bin/env bash
# The scale-out benchmarks of docs/cluster.md, brelu and PyTorch side by side in one run,
# interleaved round by round (these machines are noisy: compare medians and ratios):
#   1. loader: brelu's loader vs torch DataLoader + torchvision transforms, same JPEG folder,
#      same worker count, same batch (16 and 64 images; ImageNet training transforms at 224);
#   2. overlap: one brelu epoch against its decoding alone and its computation alone;
#   3. all-reduce: 25.6 M floats over 2 Gloo ranks on 127.0.0.1, brelu (c10d shim) vs
#      torch.distributed;
#   4. ddp: resnet18-cifar at 8 images per rank, 2 Gloo ranks of one thread each: the step with
#      DDP's Reducer against the backward pass then the all-reduce (fraction hidden).
# Usage: PYTHON=/path/to/venv/bin/python scripts/bench-cluster.sh [JPEG_ROOT] [ROUNDS]
# PYTHON must have torch 2.11 and torchvision 0.26 (a venv outside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROOT=${1:-/tmp/brelu-jpeg}
ROUNDS=${2:-3}
WORKERS=${WORKERS:-2}
B=target/release/brelu
cargo build --release --quiet
[ -d "$ROOT/train" ] || "$PY" scripts/make_jpeg_folder.py "$ROOT"
cat > "$ROOT/bench.toml" <<TOML
model = "resnet18-cifar-light"
num_classes = 1000
input = [3, 224, 224]
epochs = 1
batch_size = 64
seed = 0
[dataset]
kind = "imagenet"
path = "$ROOT"
[optimizer]
lr = 0.01
momentum = 0.9
weight_decay = 1e-4
[schedule]
kind = "cosine"
TOML
# A smaller input for the overlap run, so that a CPU step is not all the time.
sed -e 's/input = \[3, 224, 224\]/input = [3, 64, 64]/' "$ROOT/bench.toml" > "$ROOT/bench-64.toml"

cp "$ROOT/bench.toml" "$ROOT/loader-64.toml"
sed -e 's/^batch_size = 64/batch_size = 16/' "$ROOT/bench.toml" > "$ROOT/loader-16.toml"
for bs in 16 64; do
  echo "== loader ($WORKERS workers, batch $bs, 224x224)"
  for r in $(seq "$ROUNDS"); do
    "$B" bench loader -c "$ROOT/loader-$bs.toml" --workers "$WORKERS"
    "$PY" scripts/bench_loader.py "$ROOT" --workers "$WORKERS" --batch-size "$bs"
  done
done

echo "== overlap (resnet18-cifar-light at 64x64: 1 decoding thread, 1 compute thread)"
for r in $(seq "$ROUNDS"); do
  OMP_NUM_THREADS=1 "$B" bench overlap -c "$ROOT/bench-64.toml" --workers 1
done

echo "== all-reduce (25.6 M floats, 2 Gloo ranks on 127.0.0.1)"
ranks() {
  local port=$((29700 + RANDOM % 200))
  for rank in 1 0; do
    RANK=$rank LOCAL_RANK=$rank WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      OMP_NUM_THREADS=1 "$@" &
  done
  wait
}
for r in $(seq "$ROUNDS"); do
  ranks "$B" bench allreduce
  ranks "$PY" scripts/bench_allreduce.py
done

echo "== ddp (resnet18-cifar, 8 images per rank, 2 Gloo ranks of one thread each)"
sed -e 's/^model = .*/model = "resnet18-cifar"/' -e 's/^num_classes = .*/num_classes = 100/' \
  -e 's/^input = .*/input = [3, 32, 32]/' "$ROOT/bench.toml" > "$ROOT/ddp.toml"
for r in $(seq "$ROUNDS"); do
  ranks "$B" bench ddp -c "$ROOT/ddp.toml" --batch 8 --threads 1
done
