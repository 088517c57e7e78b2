#!/usr/bin/env python3
"""Prints the BENCHMARKS.md table from criterion's results (target/criterion).

For every group (one site shape): the median time of each entry, its GB/s (bytes = input
read + output written, as set in benches/block_relu.rs), and the fused kernel's speed-up
over the reference and its fraction of the best copy bandwidth measured in the same run,
for the cache-hot entries and for the memory-bound `*_cold` ones.
Usage: scripts/bench_table.py [target/criterion] [group-prefix]
"""
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
prefix = sys.argv[2] if len(sys.argv) > 2 else ""


def load(group, fn):
    d = os.path.join(root, group, fn, "new")
    try:
        est = json.load(open(os.path.join(d, "estimates.json")))
        bench = json.load(open(os.path.join(d, "benchmark.json")))
    except OSError:
        return None
    ns = est["median"]["point_estimate"]
    tp = bench.get("throughput") or {}
    nbytes = tp.get("Bytes") or tp.get("BytesDecimal")
    return ns, (nbytes / ns if nbytes else None)  # bytes/ns == GB/s


def fmt_t(ns):
    return f"{ns / 1e6:.2f} ms" if ns >= 1e5 else f"{ns / 1e3:.1f} us"


cols = ["memcpy", "tensor_copy", "fused", "fused_tensor", "torch_relu", "reference",
        "memcpy_cold", "tensor_copy_cold", "fused_cold"]
print("| group | " + " | ".join(f"{c} median (GB/s)" for c in cols)
      + " | fused vs reference | fused / copy bw | fused_cold / copy_cold bw |")
print("|" + "---|" * (len(cols) + 4))


def frac(r, num, copies):
    bw = [r[c][1] for c in copies if r.get(c) and r[c][1]]
    v = r.get(num)
    return f"{v[1] / max(bw):.0%}" if v and v[1] and bw else "-"


for group in sorted(os.listdir(root)):
    if not group.startswith(prefix) or not os.path.isdir(os.path.join(root, group)):
        continue
    r = {c: load(group, c) for c in cols}
    cells = [f"{fmt_t(v[0])} ({v[1]:.1f})" if v else "-" for v in r.values()]
    fused = r["fused"] or r["fused_tensor"]
    ref = r["reference"]
    speed = f"{ref[0] / fused[0]:.1f}x" if fused and ref else "-"
    hot = frac(dict(r, fused=fused), "fused", ("memcpy", "tensor_copy"))
    cold = frac(r, "fused_cold", ("memcpy_cold", "tensor_copy_cold"))
    print(f"| {group} | " + " | ".join(cells) + f" | {speed} | {hot} | {cold} |")
