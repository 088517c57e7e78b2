#!/usr/bin/env bash
# `make demo` until the pipeline lands: the model zoo, a model's sites, a uniform spec and
# its DReLU and byte costs, written under runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
BRELU=target/release/brelu
OUT=runs/demo
mkdir -p "$OUT"
$BRELU models
echo
$BRELU sites --model resnet18-cifar
echo
$BRELU spec uniform --model resnet18-cifar --patch 2x2 -o "$OUT/resnet18-cifar-2x2.json"
echo
echo "demo outputs are in $OUT/"
