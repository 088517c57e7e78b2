#!/usr/bin/env python3
"""Helpers of scripts/gpu-check.sh (standard library only: the GPU machine has no numpy
guarantee and CI has no PyTorch).

    gpu_check.py cifar DIR N_TRAIN N_TEST        synthetic CIFAR-100 binaries (learnable)
    gpu_check.py images DIR                      synthetic ImageNet-style folders and ADE20K (PNG)
    gpu_check.py tables A B RTOL FLOOR           compare two distortion directories
    gpu_check.py losses RUN [REF RTOL] [--min-drop F]   a training run learned (and agrees with REF)
    gpu_check.py syncs RUN STEPS                 host synchronisations per optimizer step <= 1
    gpu_check.py criterion LOG                   medians of a criterion run's output
    gpu_check.py speed DIR SECONDS [DEVICE]      evaluations/s and effective FLOP/s of an extraction
    gpu_check.py merge JSON...                   one JSON object from several
    gpu_check.py report OUT MODE                 report.json + table from OUT/steps.jsonl

Every check prints one JSON object of figures on its last line and exits 1 when it fails.
"""
import ast
import json
import math
import os
import random
import re
import struct
import sys


def fail(figures, why):
    figures["error"] = why
    print(json.dumps(figures))
    sys.exit(1)


def cifar(out, n_train, n_test):
    """CIFAR-100 binary records (coarse byte, fine byte, 3072 pixels) of 10 of the 100 classes:
    the class sets a colour and a stripe direction under noise, so a network learns it within
    a few steps."""
    os.makedirs(out, exist_ok=True)
    rnd = random.Random(0)
    for name, n in (("train.bin", n_train), ("test.bin", n_test)):
        with open(os.path.join(out, name), "wb") as f:
            for i in range(n):
                c = rnd.randrange(10)
                rec = bytearray([c // 5, c])
                for ch in range(3):
                    base = (c * 67 + 101 * ch) % 192
                    for y in range(32):
                        for x in range(32):
                            stripe = 60 if ((x if c % 2 else y) // 4) % 2 else 0
                            rec.append(base + stripe + rnd.randrange(4))
                f.write(rec)
    print(json.dumps({"train": n_train, "test": n_test}))


def png(path, w, h, rows, gray=False):
    """An 8-bit RGB or grayscale PNG from rows of bytes (no filter), with the standard library."""
    import zlib

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if gray else 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def images(out):
    """ImageNet-style class folders (10 classes, 64x64, 7 training and 1 validation image each)
    and an ADE20K tree (128x128 images whose colour follows a blocky label map, 4 + 2)."""
    rnd = random.Random(1)
    for split, n in (("train", 7), ("val", 1)):
        for c in range(10):
            d = os.path.join(out, "imagenet", split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                rows = [[(c * 25 + 80 * ch + (x // 8) * 9 + rnd.randrange(20)) % 256 for x in range(64) for ch in range(3)] for _ in range(64)]
                png(os.path.join(d, f"{i}.png"), 64, 64, rows)
    for split, n in (("training", 4), ("validation", 2)):
        di = os.path.join(out, "ade", "images", split)
        da = os.path.join(out, "ade", "annotations", split)
        os.makedirs(di, exist_ok=True)
        os.makedirs(da, exist_ok=True)
        for i in range(n):
            lab = [[1 + ((x // 32) * 7 + (y // 32) * 13 + i) % 150 for x in range(128)] for y in range(128)]
            rows = [[(l * 41 + 70 * ch + rnd.randrange(16)) % 256 for l in r for ch in range(3)] for r in lab]
            png(os.path.join(di, f"{i}.png"), 128, 128, rows)
            png(os.path.join(da, f"{i}.png"), 128, 128, lab, gray=True)
    print(json.dumps({"imagenet": 80, "ade20k": 6}))


def read_npy(path):
    with open(path, "rb") as f:
        b = f.read()
    if b[:6] != b"\x93NUMPY":
        raise ValueError(f"{path}: not an .npy file")
    major = b[6]
    hl, off = (struct.unpack("<H", b[8:10])[0], 10) if major == 1 else (struct.unpack("<I", b[8:12])[0], 12)
    head = ast.literal_eval(b[off:off + hl].decode("latin1"))
    if head["descr"] != "<f8" or head["fortran_order"]:
        raise ValueError(f"{path}: expected little-endian float64 C order, got {head}")
    n = math.prod(head["shape"])
    data = struct.unpack(f"<{n}d", b[off + hl:off + hl + 8 * n])
    return head["shape"], data


def tables(a, b, rtol, floor):
    """Distortion tables of two extraction directories agree entry by entry:
    |x - y| <= rtol * max(|x|, |y|) + floor * (largest |x| of the site). The floor is there
    because float32 rounding of the network output gives D an absolute noise that does not
    shrink with D (see tests/it/segmentation_models.rs, distortion_on_the_logit_map)."""
    rtol, floor = float(rtol), float(floor)
    ma = json.load(open(os.path.join(a, "manifest.json")))
    mb = json.load(open(os.path.join(b, "manifest.json")))
    fig = {"sites": len(ma["sites"]), "entries": 0, "max_rel": 0.0, "rtol": rtol, "floor": floor}
    if ma["model_hash"] != mb["model_hash"]:
        fail(fig, f"different weights: {ma['model_hash']} vs {mb['model_hash']}")
    if sorted(ma["sites"]) != sorted(mb["sites"]):
        fail(fig, f"different sites: {sorted(ma['sites'])} vs {sorted(mb['sites'])}")
    bad = []
    for site, meta in ma["sites"].items():
        sa, da = read_npy(os.path.join(a, meta["file"]))
        sb, db = read_npy(os.path.join(b, mb["sites"][site]["file"]))
        if sa != sb:
            fail(fig, f"{site}: shapes {sa} vs {sb}")
        top = max(abs(v) for v in da) or 1.0
        for i, (x, y) in enumerate(zip(da, db)):
            if not (math.isfinite(x) and math.isfinite(y)):
                bad.append(f"{site}[{i}]: {x} vs {y}")
                continue
            m = max(abs(x), abs(y))
            if m > floor * top:
                fig["max_rel"] = max(fig["max_rel"], abs(x - y) / m)
            if abs(x - y) > rtol * m + floor * top:
                bad.append(f"{site}[{i}]: {x:.6e} vs {y:.6e}")
        fig["entries"] += len(da)
    if bad:
        fail(fig, f"{len(bad)} entries differ, first: {bad[:3]}")
    print(json.dumps(fig))


def resnet_convs(model, classes):
    """(site after which it runs or None, multiply-adds) of every convolution and the fc in
    order, for brelu's resnet18-cifar (32x32, no stem pooling) and resnet50 (224, torchvision
    v1.5: the stride on the 3x3). Downsample branches read the block input, which precedes
    every site of the block, so an extraction never recomputes them: left out."""
    ops = []
    if model == "resnet18-cifar":
        hw, cin = 32, 64
        ops.append(("stem", hw * hw * 3 * 64 * 9))
        for s, (c, n) in enumerate(zip((64, 128, 256, 512), (2, 2, 2, 2)), 1):
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                hw //= stride
                ops.append((None, hw * hw * cin * c * 9))
                ops.append((f"layer{s}_{b}_1", 0))
                ops.append((None, hw * hw * c * c * 9))
                ops.append((f"layer{s}_{b}_2", 0))
                cin = c
        ops.append((None, cin * classes))
    elif model == "resnet50":
        hw, cin = 56, 64
        ops.append(("stem", 112 * 112 * 3 * 64 * 49))
        for s, (w, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                ops.append((None, hw * hw * cin * w))
                ops.append((f"layer{s}_{b}_1", 0))
                hw //= stride
                ops.append((None, hw * hw * w * w * 9))
                ops.append((f"layer{s}_{b}_2", 0))
                ops.append((None, hw * hw * w * 4 * w))
                ops.append((f"layer{s}_{b}_3", 0))
                cin = 4 * w
        ops.append((None, cin * classes))
    else:
        raise ValueError(f"no FLOP model for {model}")
    return ops


def suffix_macs(model, classes, site):
    ops = resnet_convs(model, classes)
    names = [n for n, _ in ops]
    if site not in names:
        raise ValueError(f"{model}: no site {site}")
    return sum(m for _, m in ops[names.index(site) + 1:])


# FP32 peaks without tensor cores (dense), from NVIDIA's data sheets, TFLOP/s.
# The first entry whose words all appear in the card's name applies.
PEAK_FP32 = {"H200": 67.0, "H100 PCIe": 51.0, "H100 NVL": 60.0, "H100": 67.0, "A100": 19.5}


def speed(d, seconds, device=""):
    """Throughput of an extraction from its manifest: (channel, option, sample) evaluations
    per second, and effective FLOP/s with each evaluation counted as the network after its
    site (2 FLOPs per multiply-add), against the card's FP32 peak when it is known."""
    m = json.load(open(os.path.join(d, "manifest.json")))
    s = float(seconds)
    classes = 100 if m["model"] == "resnet18-cifar" else 1000
    evals = flop = 0
    for site, meta in m["sites"].items():
        n = meta["shape"][0] * len(meta["options"]) * m["samples"]
        evals += n
        flop += 2 * suffix_macs(m["model"], classes, site) * n
    fig = {"timed_seconds": s, "evaluations": evals, "evaluations_per_s": evals / s,
           "channel_options_per_s": evals / m["samples"] / s, "effective_tflop_s": flop / s / 1e12}
    peak = next((v for k, v in PEAK_FP32.items() if all(w in device for w in k.split())), None)
    if peak:
        fig["fp32_peak_tflop_s"] = peak
        fig["fraction_of_fp32_peak"] = fig["effective_tflop_s"] / peak
    print(json.dumps(fig))


def merge(objects):
    """One JSON object from several (later keys win), for a step's figures."""
    out = {}
    for o in objects:
        out.update(json.loads(o) or {})
    print(json.dumps(out))


def metrics(run):
    lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
    if not lines:
        raise ValueError(f"{run}: no metrics")
    return lines


def losses(args):
    min_drop = None
    if "--min-drop" in args:
        i = args.index("--min-drop")
        min_drop = float(args[i + 1])
        args = args[:i] + args[i + 2:]
    run = args[0]
    m = metrics(run)
    ls = [r["train_loss"] for r in m]
    fig = {"losses": ls, "images_per_s": m[-1]["images_per_s"], "min_drop": min_drop}
    if not all(math.isfinite(v) for v in ls):
        fail(fig, "a loss is not finite")
    # Learning: the last interval's mean loss is below the first one's by at least min_drop.
    if min_drop is not None and not ls[-1] < ls[0] * (1.0 - min_drop):
        fail(fig, f"loss did not fall by {min_drop:.0%}: {ls[0]:.4f} -> {ls[-1]:.4f}")
    if len(args) > 1:
        ref, rtol = args[1], float(args[2])
        r0 = metrics(ref)[0]["train_loss"]
        fig.update({"reference_first_loss": r0, "rtol": rtol})
        if abs(ls[0] - r0) > rtol * abs(r0):
            fail(fig, f"first interval's loss {ls[0]:.6f} vs reference {r0:.6f} (rtol {rtol})")
    print(json.dumps(fig))


def syncs(run, steps):
    """The training loop's host synchronisations (metrics.jsonl's host_syncs) over its STEPS
    optimizer steps: at most one per step."""
    m = metrics(run)
    n = sum(r.get("host_syncs", 0) for r in m)
    fig = {"host_syncs": n, "steps": int(steps), "host_syncs_per_step": n / int(steps),
           "losses": [r["train_loss"] for r in m]}
    if not all(math.isfinite(v) for v in fig["losses"]):
        fail(fig, "a loss is not finite")
    if n > int(steps):
        fail(fig, f"{n} host synchronisations in {steps} optimizer steps")
    print(json.dumps(fig))


def criterion(log):
    """Criterion prints `name\\n    time:   [low median high]` per benchmark."""
    text = open(log).read()
    unit = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    out = {}
    for m in re.finditer(r"^(\S+)\s*\n?\s+time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", text, re.M):
        out[m.group(1)] = float(m.group(2)) * unit[m.group(3)]
    if not out:
        fail({}, "no criterion results in the output")
    print(json.dumps({"median_s": out}))


def report(out, mode):
    steps = [json.loads(l) for l in open(os.path.join(out, "steps.jsonl")) if l.strip()]
    facts = {}
    fp = os.path.join(out, "facts.json")
    if os.path.exists(fp):
        facts = json.load(open(fp))
    rep = {"mode": mode, "facts": facts, "steps": steps, "passed": all(s["pass"] for s in steps)}
    tmp = os.path.join(out, ".report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(rep, f, indent=2)
    os.replace(tmp, os.path.join(out, "report.json"))
    print(f"\n{mode} check on {facts.get('device', '?')}\n")
    print("| step | result | seconds | figures |")
    print("|---|---|---|---|")
    for s in steps:
        fig = {k: v for k, v in s.get("figures", {}).items() if k not in ("losses", "median_s")}
        if "losses" in s.get("figures", {}):
            fig["losses"] = [round(v, 4) for v in s["figures"]["losses"]]
        if "median_s" in s.get("figures", {}):
            fig["median_us"] = {k: round(v * 1e6, 1) for k, v in s["figures"]["median_s"].items()}
        print(f"| {s['name']} | {'PASS' if s['pass'] else 'FAIL'} | {s['seconds']:.1f} | {json.dumps(fig)} |")
    sys.exit(0 if rep["passed"] else 1)


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    cmd, rest = a[0], a[1:]
    if cmd == "cifar":
        cifar(rest[0], int(rest[1]), int(rest[2]))
    elif cmd == "images":
        images(rest[0])
    elif cmd == "tables":
        tables(*rest)
    elif cmd == "losses":
        losses(rest)
    elif cmd == "syncs":
        syncs(*rest)
    elif cmd == "speed":
        speed(*rest)
    elif cmd == "merge":
        merge(rest)
    elif cmd == "criterion":
        criterion(rest[0])
    elif cmd == "report":
        report(rest[0], rest[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
