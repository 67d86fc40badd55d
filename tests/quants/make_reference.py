#!/usr/bin/env python3
"""Writes tests/data/quants/reference.json: random weight blocks of every GGUF type the engine
reads, with their values as llama.cpp's own Python package dequantizes them (`gguf`, pinned
below: gguf-py from the llama.cpp tree, numpy in float32). The engine's dequantizers and kernels
are checked against these values (tests/engine_reference.rs).

Usage: make_reference.py [OUT]. Needs numpy and gguf: pip install --target DIR numpy gguf==0.19.0,
then PYTHONPATH=DIR.
"""
import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

# (type, rows, columns, offsets of the f16 scales in each block that random bytes must not
# make NaN or huge; signed: whether that scale may be negative (an offset), not only a scale).
CASES = [
    (T.Q4_0, 8, 64, [(0, False)]),
    (T.Q4_1, 8, 64, [(0, False), (2, True)]),
    (T.Q5_0, 8, 64, [(0, False)]),
    (T.Q5_1, 8, 64, [(0, False), (2, True)]),
    (T.Q8_0, 8, 64, [(0, False)]),
    (T.Q4_K, 8, 256, [(0, False), (2, False)]),
    (T.Q5_K, 8, 256, [(0, False), (2, False)]),
    (T.Q6_K, 8, 256, [(208, False)]),
]
BLOCK = {T.Q4_0: (32, 18), T.Q4_1: (32, 20), T.Q5_0: (32, 22), T.Q5_1: (32, 24),
         T.Q8_0: (32, 34), T.Q4_K: (256, 144), T.Q5_K: (256, 176), T.Q6_K: (256, 210)}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "data", "quants", "reference.json")
    rng = np.random.default_rng(20261203)
    cases = []
    for ty, rows, cols, scales in CASES:
        per, size = BLOCK[ty]
        n = rows * cols // per
        raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
        for off, signed in scales:
            v = rng.uniform(0.002, 0.05, size=n)
            if signed:
                v *= rng.choice([-1.0, 1.0], size=n)
            raw[:, off:off + 2] = v.astype(np.float16).view(np.uint8).reshape(n, 2)
        values = dequantize(raw.reshape(-1), ty).astype(np.float32).reshape(-1)
        assert values.size == rows * cols and np.isfinite(values).all()
        cases.append({
            "type": ty.name,
            "rows": rows,
            "cols": cols,
            "raw": raw.tobytes().hex(),
            # Each value's f32 bits, little-endian hex: exact, and half the size of decimals.
            "values": values.astype("<f4").tobytes().hex(),
        })
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"made_by": "tests/quants/make_reference.py with gguf 0.19.0 (llama.cpp's "
                   "gguf-py), numpy float32", "cases": cases}, f, indent=1)
        f.write("\n")
    print(out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    main()
