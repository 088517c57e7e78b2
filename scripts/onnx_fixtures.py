#!/usr/bin/env python3
"""Writes the ONNX import fixtures of tests/it/onnx.rs: three small PyTorch networks exported
with `torch.onnx.export` (the TorchScript exporter, whose node names carry the module paths,
e.g. `/layer1/layer1.0/relu_1/Relu`), each with a random input batch and the logits PyTorch
computes for it, as .npy files. Run once, not at test time (needs torch and torchvision):

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.11.0 torchvision==0.26.0 onnx
    /tmp/tv/bin/python scripts/onnx_fixtures.py tests/fixtures/onnx

The networks (random weights, random batch-norm statistics so that folding is visible):
- resnet18-w16: torchvision's ResNet with BasicBlock [2, 2, 2, 2], a CIFAR stem (3x3 conv,
  stride 1, no max-pool) and widths 16-32-64-128, 10 classes, input 3x32x32. Exported in eval
  mode, so the exporter folds every batch norm into its convolution.
- mobilenet_v2-w025: torchvision's MobileNetV2 at width 0.25, 10 classes, input 3x32x32,
  exported with its batch norms kept (TrainingMode.PRESERVE). ReLU6 exports as Clip(0, 6); brelu
  imports it as a ReLU site (ReLU6 is replaced by ReLU before fine-tuning, SPEC "sites"), so
  the logits saved are those of the same network with every ReLU6 swapped for ReLU.
- deeplabv3-tiny: a small dilated backbone (stem, max-pool, an avg-pool with padding counted,
  explicit zero padding, a per-channel scale and shift, a second ReLU call of one module)
  with torchvision's ASPP (rates 2, 4, 6; 24 channels) and a DeepLabV3-style head, upsampled
  bilinearly to the input (align_corners False) after an align_corners True resize; 5 classes,
  input 3x32x32.

It also rewrites the published-format spec fixtures (scripts/published_spec_fixture.py) into
tests/fixtures/published, so one run makes every interop fixture.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.segmentation.deeplabv3 import ASPP


class CifarResNet18(ResNet):
    def __init__(self, width=16, num_classes=10):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, 2, stride=2)
        self.fc = nn.Linear(8 * width, num_classes)


class TinyDeepLab(nn.Module):
    def __init__(self, num_classes=5, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=True)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, 1, 0, dilation=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.scale = nn.Parameter(torch.rand(1, 2 * c, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 2 * c, 1, 1) * 0.1)
        self.conv3 = nn.Conv2d(2 * c, 2 * c, 3, 1, 2, dilation=2, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * c)
        self.aspp = ASPP(2 * c, [2, 4, 6], 24)
        self.head = nn.Sequential(
            nn.Conv2d(24, 24, 3, padding=1, bias=False),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.Conv2d(24, num_classes, 1),
        )

    def forward(self, x):
        size = x.shape[-2:]
        y = self.pool(self.relu(self.bn(self.stem(x))))
        y = self.avg(y)
        y = F.pad(y, (1, 1, 1, 1))
        y = self.relu(self.bn2(self.conv2(y)) * self.scale + self.shift)
        y = self.relu(self.bn3(self.conv3(y)))
        y = self.head(self.aspp(y))
        y = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=True)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


def randomise_bn(model, gen):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def relu6_to_relu(model):
    for name, m in model.named_children():
        if isinstance(m, nn.ReLU6):
            setattr(model, name, nn.ReLU(inplace=False))
        else:
            relu6_to_relu(m)


def export(name, model, input_shape, out, gen, training=torch.onnx.TrainingMode.EVAL, swap=None):
    randomise_bn(model, gen)
    model.eval()
    x = torch.randn(2, *input_shape, generator=gen)
    path = os.path.join(out, f"{name}.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], training=training,
                      do_constant_folding=True)
    if swap is not None:
        swap(model)
    # Every call of a ReLU module is a site: count the calls and the elements they act on.
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(o[0].numel()))
             for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    np.save(os.path.join(out, f"{name}.input.npy"), x.numpy().astype(np.float32))
    np.save(os.path.join(out, f"{name}.logits.npy"), logits.numpy().astype(np.float32))
    return {"file": f"{name}.onnx", "input": list(input_shape), "relu_calls": len(calls),
            "relus_per_image": sum(calls), "logits": list(logits.shape)}


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    meta = {
        "resnet18-w16": export("resnet18-w16", CifarResNet18(), (3, 32, 32), out, gen),
        "mobilenet_v2-w025": export(
            "mobilenet_v2-w025", mobilenet_v2(width_mult=0.25, num_classes=10), (3, 32, 32),
            out, gen, training=torch.onnx.TrainingMode.PRESERVE, swap=relu6_to_relu),
        "deeplabv3-tiny": export("deeplabv3-tiny", TinyDeepLab(), (3, 32, 32), out, gen),
        "torch": torch.__version__,
    }
    with open(os.path.join(out, "fixtures.json"), "w") as f:
        json.dump(meta, f, indent=1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import published_spec_fixture
    published_spec_fixture.main(os.path.join(os.path.dirname(os.path.abspath(out)), "published"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/onnx")
