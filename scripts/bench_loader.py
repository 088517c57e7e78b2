#!/usr/bin/env python3
"""PyTorch's side of `brelu bench loader`: images per second of torchvision's ImageFolder with
the standard ImageNet training transforms (RandomResizedCrop, horizontal flip, ToTensor,
Normalize) through a DataLoader with N worker processes, over one epoch (or --batches)."""
import argparse, json, time

import torch
from torchvision import datasets, transforms

p = argparse.ArgumentParser()
p.add_argument("root", help="folder with train/<class>/*.jpg")
p.add_argument("--side", type=int, default=224)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--workers", type=int, default=2)
p.add_argument("--batches", type=int, default=None)
a = p.parse_args()

tf = transforms.Compose([
    transforms.RandomResizedCrop(a.side),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])
ds = datasets.ImageFolder(f"{a.root}/train", tf)
dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True,
                                 num_workers=a.workers, persistent_workers=False)
t0 = time.perf_counter()
n = 0
for i, (x, _) in enumerate(dl):
    n += x.shape[0]
    if a.batches is not None and i + 1 >= a.batches:
        break
s = time.perf_counter() - t0
print(json.dumps({"engine": f"torch {torch.__version__} DataLoader", "workers": a.workers,
                  "batch_size": a.batch_size, "images": n, "seconds": s, "images_per_s": n / s}))
