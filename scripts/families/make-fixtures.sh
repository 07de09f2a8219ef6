#!/usr/bin/env bash
# Regenerates engine/tests/fixtures/families/*.json: llama.cpp's logits for every tiny family GGUF. For
# maintainers (after changing gen-ggufs.py or the prompt); tests and CI never run this, they compare ult
# against the committed fixtures. Steps: build llama.cpp's static libraries (scripts/build-llama-cpp.sh,
# cached under ~/.cache/ult), compile scripts/families/llama-logits.cpp against them, write the GGUFs and
# their sha256 list (make-ggufs.sh --update), and run the dumper on each file: the prompt of prompt.txt
# teacher-forced, the top 8 logits and the norm of the rest per position, 12 greedy tokens.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
base=${ULT_CACHE:-$HOME/.cache/ult}/llama.cpp-0.3.36
"$root/scripts/build-llama-cpp.sh" >/dev/null
build=$base/build
llama=$base/src/vendor/llama.cpp
bin=$base/llama-logits
if [ ! -x "$bin" ] || [ "$root/scripts/families/llama-logits.cpp" -nt "$bin" ]; then
  g++ -O2 -std=c++17 -I"$llama/include" -I"$llama/ggml/include" "$root/scripts/families/llama-logits.cpp" \
    -o "$bin" "$build/src/libllama.a" "$build/ggml/src/libggml.a" "$build/ggml/src/libggml-cpu.a" \
    "$build/ggml/src/libggml-base.a" -fopenmp -lpthread -ldl
fi
"$root/scripts/families/make-ggufs.sh" --update
models=${ULT_MODELS_DIR:-$root/models}/families
fixtures=$root/engine/tests/fixtures/families
mkdir -p "$fixtures"
rm -f "$fixtures"/*.json
while read -r _ file; do
  "$bin" "$models/$file" "$root/scripts/families/prompt.txt" 8 12 >"$fixtures/${file%.gguf}.json" 2>/dev/null
  echo "fixture: ${file%.gguf}.json"
done <"$root/scripts/families/ggufs.sha256"
