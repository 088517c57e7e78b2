#!/usr/bin/env python3
"""PyTorch's side of `brelu bench allreduce`: the same sum all-reduce of N floats over the
ranks of a launch (torch.distributed, Gloo on the CPU), timed the same way; rank 0 prints one
JSON object. Run it under the same launcher variables (see scripts/bench-cluster.sh); needs
torch in a venv outside the repository."""
import argparse, json, time

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--floats", type=int, default=25_600_000)
p.add_argument("--iters", type=int, default=10)
a = p.parse_args()

dist.init_process_group("gloo")
t = torch.ones(a.floats)
times = []
for i in range(a.iters + 2):
    dist.barrier()
    t0 = time.perf_counter()
    dist.all_reduce(t)
    if i >= 2:
        times.append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    times.sort()
    m = times[len(times) // 2]
    n = dist.get_world_size()
    gb = a.floats * 4 / m / 1e9
    print(json.dumps({"engine": f"torch {torch.__version__} torch.distributed", "backend": "gloo",
                      "ranks": n, "floats": a.floats, "median_s": m, "min_s": times[0],
                      "algbw_gb_s": gb, "busbw_gb_s": gb * 2 * (n - 1) / n}))
dist.destroy_process_group()
