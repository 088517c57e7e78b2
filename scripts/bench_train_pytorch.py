#!/usr/bin/env python3
"""PyTorch eager reference for `cargo bench --bench train_step`: the same train step
(forward, cross-entropy, backward, SGD momentum 0.9 + weight decay) and eval step (forward
in eval mode without autograd) of ResNet18-CIFAR (32x32, 100 classes), ResNet50
(224x224, 1000 classes, torchvision v1.5 layout) and the Fashion-MNIST default network
(resnet18-cifar-light at 1x28x28, 10 classes), on random data, images per second.

The networks are written out here (no torchvision needed) with the same layers as brelu's
model zoo. Usage (scripts/bench-train.sh runs both sides in one go):
    python3 scripts/bench_train_pytorch.py [--steps 5] [--only resnet18-cifar]
(--steps defaults to $BRELU_BENCH_STEPS, else 5, as in the Rust bench.)
Prints one JSON line per (model, step): {"model", "step", "batch", "images_per_s", ...}.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, c, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = None
        if stride != 1 or cin != c:
            self.down = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, c, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        # v1.5: the stride sits on the 3x3 conv.
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, 4 * c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * c)
        self.down = None
        if stride != 1 or cin != 4 * c:
            self.down = nn.Sequential(
                nn.Conv2d(cin, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, block, layers, classes, cifar_stride=None, base=64, cin=3):
        super().__init__()
        if cifar_stride is not None:
            self.stem = nn.Sequential(
                nn.Conv2d(cin, base, 3, cifar_stride, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU()
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(cin, base, 7, 2, 3, bias=False),
                nn.BatchNorm2d(base),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        cin, blocks = base, []
        for i, n in enumerate(layers):
            c = base * 2**i
            for j in range(n):
                blocks.append(block(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS = {
    # name: (constructor, batch, input [C, H, W]); the same list as benches/train_step.rs
    "resnet18-cifar-light": (
        lambda: ResNet(Basic, [2, 2, 2, 2], 10, cifar_stride=2, base=32, cin=1),
        128,
        (1, 28, 28),
    ),
    "resnet18-cifar": (lambda: ResNet(Basic, [2, 2, 2, 2], 100, cifar_stride=1), 64, (3, 32, 32)),
    "resnet50": (lambda: ResNet(Bottleneck, [3, 4, 6, 3], 1000), 16, (3, 224, 224)),
}


def timed(fn, steps, sync=lambda: None):
    fn()  # warm-up (allocator, oneDNN primitive cache, cuDNN autotuning)
    sync()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()  # CUDA launches are asynchronous: time the work, not the launch
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=int(os.environ.get("BRELU_BENCH_STEPS", "5")))
    p.add_argument("--only", default=None, help="one model name")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: per model)")
    a = p.parse_args()
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    for name, (make, batch, shape) in MODELS.items():
        if a.only and name != a.only:
            continue
        batch = a.batch or batch
        m = make().to(dev)
        x = torch.randn(batch, *shape, device=dev)
        y = torch.randint(0, m.fc.out_features, (batch,), device=dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def train_step():
            m.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        def eval_step():
            m.eval()
            with torch.no_grad():
                m(x)

        for step, fn in (("train", train_step), ("eval", eval_step)):
            s = timed(fn, a.steps, sync)
            print(
                json.dumps(
                    {
                        "impl": "pytorch-eager",
                        "model": name,
                        "step": step,
                        "batch": batch,
                        "device": a.device,
                        "median_s": s,
                        "images_per_s": batch / s,
                        "threads": torch.get_num_threads(),
                        "torch": torch.__version__,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
