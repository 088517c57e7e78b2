#!/usr/bin/env bash
# `make demo`: the whole method on Fashion-MNIST (configs/demo.toml) into runs/demo-pipeline.
# Installs the Debian data set package when it is missing. A second run reuses every finished
# stage and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
BRELU=${BRELU:-target/release/brelu}
OUT=${OUT:-runs/demo-pipeline}
DATA=/usr/share/datasets/fashion-mnist
if ! ls "$DATA"/train-images-idx3-ubyte* >/dev/null 2>&1; then
    echo "Fashion-MNIST is missing: installing the Debian package dataset-fashion-mnist"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get install -y dataset-fashion-mnist >/dev/null || {
        $SUDO apt-get update >/dev/null && $SUDO apt-get install -y dataset-fashion-mnist >/dev/null
    }
fi
time $BRELU pipeline --config configs/demo.toml -o "$OUT"
echo
echo "report: $OUT/report.md (plots beside it)"
