#!/usr/bin/env python3
"""Unpacks the xz-compressed executables of a GPU pack (scripts/gpu.sh packs them compressed so
that the pack stays far below what a lent machine takes): every bin/NAME.xz beside this script
becomes bin/NAME, executable, unless bin/NAME is already there and newer. Only the standard
library is used (the GPU machine has python3, nothing else is assumed)."""
import lzma
import os
import shutil
import sys

here = os.path.dirname(os.path.abspath(__file__))
bindir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "bin")
for name in sorted(os.listdir(bindir)):
    if not name.endswith(".xz"):
        continue
    src = os.path.join(bindir, name)
    dst = src[: -len(".xz")]
    if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
        continue
    tmp = dst + ".tmp"
    with lzma.open(src, "rb") as f, open(tmp, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dst)
