#!/usr/bin/env python3
"""Writes a spec in the published code's format (yg320/secure_inference: a pickle.dump of a dict
of layer name -> numpy int32 array [channels, 2] of [height, width] patch sizes, [0, 1] =
identity, [1, 0] = zero) for brelu's resnet18-cifar at 3x32x32, and the same spec in brelu's
JSON format, for tests/it/spec.rs. Run once (needs numpy; not at test time):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install numpy
    /tmp/venv/bin/python scripts/published_spec_fixture.py tests/fixtures/published
"""
import json
import pickle
import sys

import numpy as np

# The published layer names of ResNet18 (CIFAR), channels and map sides (brelu's site names
# are the same).
LAYERS = [("stem", 64, 32)]
for layer, (c, side) in enumerate([(64, 32), (128, 16), (256, 8), (512, 4)], start=1):
    for block in range(2):
        for relu in (1, 2):
            LAYERS.append((f"layer{layer}_{block}_{relu}", c, side))

# Options cycled over the channels: patches (height, width), identity and zero.
CYCLE = [(1, 1), (2, 2), (1, 3), (3, 1), (0, 1), (2, 4), (1, 0), (4, 4), (3, 3), (8, 8)]


def main(out):
    spec, sites = {}, {}
    for k, (name, channels, side) in enumerate(LAYERS):
        rows = [CYCLE[(k + ch) % len(CYCLE)] for ch in range(channels)]
        rows = [(min(h, side), min(w, side)) if (h, w) not in [(0, 1), (1, 0)] else (h, w)
                for h, w in rows]
        spec[name] = np.array(rows, dtype=np.int32)
        sites[name] = ["identity" if r == (0, 1) else "zero" if r == (1, 0) else list(r)
                       for r in rows]
    with open(f"{out}/resnet18-cifar.pickle", "wb") as f:
        pickle.dump(obj=spec, file=f)
    # The same dict as Python 2 era tools wrote it (protocol 2: array bytes through _codecs).
    with open(f"{out}/resnet18-cifar.p2.pickle", "wb") as f:
        pickle.dump(obj=spec, file=f, protocol=2)
    with open(f"{out}/resnet18-cifar.json", "w") as f:
        json.dump({"model": "resnet18-cifar", "input": [3, 32, 32], "sites": sites}, f)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/published")
