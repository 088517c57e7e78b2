#!/usr/bin/env python3
"""Writes an ImageNet-like folder for loader benchmarks: ROOT/train/<class>/<i>.jpg and
ROOT/val/<class>/<i>.jpg, JPEG quality 90, at ImageNet's typical sizes (500x375, 375x500,
500x333, 500x500, ...), with smooth gradients plus noise so that they compress like photos.
Needs numpy and Pillow. Usage: make_jpeg_folder.py ROOT [--images 2000] [--classes 10]"""
import argparse, os

import numpy as np
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("--images", type=int, default=2000)
p.add_argument("--classes", type=int, default=10)
p.add_argument("--val", type=int, default=200)
a = p.parse_args()

sizes = [(500, 375), (375, 500), (500, 333), (500, 500), (333, 500), (500, 400)]
rng = np.random.default_rng(0)
for split, count in [("train", a.images), ("val", a.val)]:
    for i in range(count):
        c = i % a.classes
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (c + 1) * 3) % 256, (yy * 2 + i) % 256, ((xx + yy) // 2) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        d = os.path.join(a.root, split, f"class{c:03d}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)
