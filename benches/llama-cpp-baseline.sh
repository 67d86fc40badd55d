#!/usr/bin/env bash
# A baseline measured on the same machine in the same run: llama.cpp's llama-bench and
# llama-batched-bench on the default model, then `smolchat bench`, and the ratios.
#
# llama.cpp comes from the source distribution of the PyPI package llama-cpp-python (which
# vendors it; checked against PyPI's SHA-256), built once into ~/.cache/smolchat/. Building takes
# ~10 minutes on 2 cores, so this is not part of CI. Usage: bash benches/llama-cpp-baseline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
threads="${THREADS:-$(nproc)}"
model="models/SmolLM2-135M-Instruct.Q4_1.gguf"
cache="$HOME/.cache/smolchat/llama-cpp-python-$version"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/smolchat-target}"

if [ ! -x "$cache/build/bin/llama-batched-bench" ]; then
  mkdir -p "$cache"
  echo "--- llama.cpp from llama-cpp-python $version (PyPI sdist)"
  python3 - "$version" "$cache/src.tar.gz" <<'EOF'
import hashlib, json, sys, urllib.parse, urllib.request
version, dest = sys.argv[1:]
# The project's JSON (some registry mirrors serve no per-version JSON), its files for `version`.
api = "https://pypi.org/pypi/llama-cpp-python/json"
files = json.load(urllib.request.urlopen(api))["releases"][version]
sdist = next(u for u in files if u["packagetype"] == "sdist")
data = urllib.request.urlopen(urllib.parse.urljoin(api, sdist["url"])).read()
if hashlib.sha256(data).hexdigest() != sdist["digests"]["sha256"]:
    sys.exit("SHA-256 mismatch")
open(dest, "wb").write(data)
EOF
  tar xzf "$cache/src.tar.gz" -C "$cache"
  command -v cmake >/dev/null || python3 -m pip install -q cmake
  src="$cache/llama_cpp_python-$version/vendor/llama.cpp"
  cmake -S "$src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$cache/build" --target llama-bench llama-batched-bench -j "$(nproc)"
fi
cargo build --release --quiet
cargo run --release --quiet -- fetch-model
bin="$cache/build/bin"

echo "--- llama.cpp: llama-bench (prefill 128/512, decode 128 at the start) and batched-bench"
"$bin/llama-bench" -m "$model" -t "$threads" -p 128,512 -n 128 -r 3 -o json >/tmp/llama-bench.json
# 16 sequences of 128-token prompts, 32 new tokens each, up to 16 in parallel.
"$bin/llama-batched-bench" -m "$model" -t "$threads" -c 8192 -b 2048 -ub 512 \
  -npp 128 -ntg 32 -npl 1,2,4,8,16 --output-format jsonl 2>&1 | grep '^{' >/tmp/llama-batched.jsonl
echo "--- smolchat bench"
"$CARGO_TARGET_DIR/release/smolchat" --threads "$threads" bench --json 2>/dev/null | tail -1 >/tmp/smolchat-bench.json

python3 - <<'EOF'
import json
lb = json.load(open("/tmp/llama-bench.json"))
pp = {r["n_prompt"]: r["avg_ts"] for r in lb if r["n_gen"] == 0}
tg = next(r["avg_ts"] for r in lb if r["n_prompt"] == 0)
batched = {}
for line in open("/tmp/llama-batched.jsonl"):
    r = json.loads(line)
    batched[r["pl"]] = r["speed_tg"]
s = json.load(open("/tmp/smolchat-bench.json"))
rows = [
    ("prefill, 128-token prompt", s["prefill_128"], pp.get(128)),
    ("prefill, 512-token prompt", s["prefill_512"], pp.get(512)),
    ("decode, 1 stream", s["decode_1"], tg),
]
for b in (2, 4, 8, 16):
    rows.append((f"decode, {b} sequences (aggregate)", s["decode_batch"].get(str(b)), batched.get(b)))
print("| measure | smolchat tokens/s | llama.cpp tokens/s | ratio |")
print("|---|---|---|---|")
for name, ours, theirs in rows:
    ratio = f"{ours / theirs:.2f}×" if ours and theirs else "—"
    print(f"| {name} | {ours:.0f} | {theirs:.0f} | {ratio} |" if theirs else f"| {name} | {ours:.0f} | — | — |")
print(f"\nsmolchat peak RSS: {s['peak_rss_mb']:.0f} MB")
EOF
