#!/usr/bin/env bash
# `make demo` until the pipeline lands: the model zoo, a model's sites, a uniform spec and
# its DReLU and byte costs, and the knapsack over a budget sweep on synthetic distortion
# tables, written under runs/demo/.
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
# The knapsack on synthetic tables (distortion extraction from a trained network is not in
# brelu yet): one spec per budget, a report and a plot of distortion against DReLUs.
$BRELU distortion synthetic --model resnet18-cifar -o "$OUT/synthetic-tables"
$BRELU knapsack --model resnet18-cifar -d "$OUT/synthetic-tables" --ratio 0.06 -o "$OUT/knapsack-6pct.json"
echo
$BRELU knapsack --model resnet18-cifar -d "$OUT/synthetic-tables" --sweep 0.03,0.06,0.09,0.12,0.15,0.18 -o "$OUT/sweep"
echo
echo "demo outputs are in $OUT/ (plot: $OUT/sweep/sweep.png)"
