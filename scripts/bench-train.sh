#!/usr/bin/env bash
# Train/eval step images/s: brelu (benches/train_step.rs) and PyTorch eager
# (scripts/bench_train_pytorch.py, the same networks and steps), one model after the other so
# both sides of a pair see the same machine state. PyTorch comes from the PyPI wheel in a
# virtual environment under .bench-venv (made once; it downloads torch==2.11.0 with its
# dependencies, a few GB). Output: JSON lines in target/bench-train.jsonl and a table.
# Usage: [BRELU_BENCH_STEPS=5] scripts/bench-train.sh [MODEL ...]   (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
# Both sides allocate large tensors on transparent huge pages, as the brelu binary does.
export THP_MEM_ALLOC_ENABLE=${THP_MEM_ALLOC_ENABLE:-1}
VENV=${VENV:-.bench-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.11.0 numpy
fi
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(resnet18-cifar-light resnet18-cifar resnet50)
cargo bench --bench train_step --no-run
out=target/bench-train.jsonl
: > "$out"
for m in "${models[@]}"; do
  cargo bench --bench train_step -- "$m" | tee -a "$out"
  "$VENV/bin/python" scripts/bench_train_pytorch.py --only "$m" | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ref = {(r["model"], r["step"]): r["images_per_s"] for r in rows if r["impl"] == "pytorch-eager"}
print("\n| model | step | batch | brelu relu img/s | brelu bReLU 2x2 img/s | PyTorch eager img/s | brelu relu / PyTorch |")
print("|---|---|---|---|---|---|---|")
for (m, s), p in ref.items():
    b = {r["variant"]: r for r in rows if r["impl"] == "brelu" and r["model"] == m and r["step"] == s}
    relu, br = b["relu"]["images_per_s"], b["brelu-2x2"]["images_per_s"]
    print(f"| {m} | {s} | {b['relu']['batch']} | {relu:.1f} | {br:.1f} | {p:.1f} | {relu / p:.2f} |")
PY
