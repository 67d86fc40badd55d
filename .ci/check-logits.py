#!/usr/bin/env python3
"""Checks a smolchat binary's logits on one device against Hugging Face transformers.

Usage: check-logits.py BINARY DEVICE

Runs `smolchat --device DEVICE logits` on the tiny SmolLM3 (NoPE layers) and tiny llama fixture
models for every reference sequence (tests/data/tiny-smollm3/reference.json, made by
transformers) and holds the top-10 logits to the same bounds as the Rust tests: within 2.0 (8-bit
activations), and the same top-1 token wherever the reference's gap is at least 1.0. Then it
generates greedily from all three sequences at once (`generate` with several `--ids`: packed
prompt chunks, then decode rows of different lengths in one step), with the device backend's own
kernels and with candle's paths (decode rows in one padded attention, then each in its own), and
holds each continuation to the reference's greedy tokens up to the first step whose gap is below
1.0.
Made for the lent GPU machines, where there is no cargo; CI runs it on the CPU so it stays
working.
"""
import json
import os
import pathlib
import subprocess
import sys

TOL = 2.0
GAP_MIN = 1.0
# The device backend's own kernels (paged decode attention, the KV write kernel), then candle's
# paths with all decode rows in one padded attention, then one attention each.
PATHS = [
    {},
    {"SMOLCHAT_DECODE_ATTENTION": "gathered", "SMOLCHAT_KV_WRITE": "scatter"},
    {"SMOLCHAT_DECODE_ATTENTION": "gathered", "SMOLCHAT_KV_WRITE": "scatter",
     "SMOLCHAT_DECODE_GROUP_COST": "0"},
]
root = pathlib.Path(__file__).resolve().parent.parent
data = root / "tests/data/tiny-smollm3"


def main() -> int:
    binary, device = sys.argv[1], sys.argv[2]
    ref = json.loads((data / "reference.json").read_text())
    worst = 0.0
    for model, variant in [
        ("tiny-smollm3-q8_0.gguf", "q8_0_nope"),
        ("tiny-llama-rope-all-q8_0.gguf", "q8_0_rope_all"),
    ]:
        for seq, want in zip(ref["sequences"], ref["variants"][variant]):
            ids = ",".join(str(i) for i in seq["ids"])
            out = subprocess.run(
                [binary, "--model", str(data / model), "--device", device,
                 "logits", "--ids", ids, "--top", "50"],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]
            got = json.loads(out)["positions"]
            for p, (g, w) in enumerate(zip(got, want["positions"])):
                ours = {int(i): l for i, l in g["top"]}
                for tid, tl in zip(w["top_ids"], w["top_logits"]):
                    # A reference top-10 token outside our top 50 is far off.
                    d = abs(ours.get(int(tid), float("-inf")) - tl)
                    worst = max(worst, d)
                    if d >= TOL:
                        print(f"FAIL {variant}/{seq['name']} position {p} token {tid}: "
                              f"{ours.get(int(tid))} vs {tl}")
                        return 1
                gap = w["top_logits"][0] - w["top_logits"][1]
                if gap >= GAP_MIN and g["top"][0][0] != w["top_ids"][0]:
                    print(f"FAIL {variant}/{seq['name']} position {p}: top-1 "
                          f"{g['top'][0][0]} vs {w['top_ids'][0]}")
                    return 1
        for kernels in PATHS:
            if not greedy_packed(binary, device, model, ref, variant, kernels):
                return 1
    print(f"ok: {device} matches transformers on the tiny models "
          f"(largest top-10 logit difference {worst:.3f}; packed greedy tokens as the reference's)")
    return 0


def greedy_packed(binary, device, model, ref, variant, kernels) -> bool:
    """The three sequences' greedy continuations, generated together, against the reference."""
    wants = ref["variants"][variant]
    steps = len(wants[0]["greedy_ids"])
    cmd = [binary, "--model", str(data / model), "--device", device, "generate",
           "--max-tokens", str(steps), "--ignore-eos", "--json"]
    for seq in ref["sequences"]:
        cmd += ["--ids", ",".join(str(i) for i in seq["ids"])]
    env = dict(os.environ, **kernels)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])["sequences"]
    for seq, want, g in zip(ref["sequences"], wants, got):
        if len(g["ids"]) != steps:
            print(f"FAIL {variant}/{seq['name']}: {len(g['ids'])} tokens, not {steps}")
            return False
        for i, step in enumerate(want["greedy_steps"]):
            if step["gap"] < GAP_MIN:
                break
            if g["ids"][i] != want["greedy_ids"][i]:
                print(f"FAIL {variant}/{seq['name']} packed greedy step {i} ({kernels or 'default'}"
                      f"): got {g['ids']}, want {want['greedy_ids']}")
                return False
    return True


if __name__ == "__main__":
    sys.exit(main())
