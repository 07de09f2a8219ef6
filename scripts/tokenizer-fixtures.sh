#!/usr/bin/env bash
# Regenerates engine/tests/fixtures/tokenizer/*.json from independent tokenizer implementations
# (transformers, sentencepiece, tokenizers) in a private virtual environment. The fixtures are committed;
# tests never run this.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${ULT_CACHE:-$HOME/.cache/ult}/fixture-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "transformers==4.57.*" "tokenizers==0.22.*" "sentencepiece==0.2.*" \
    "protobuf==7.*" "gguf==0.17.*" "numpy<3"
fi
"$root/scripts/fetch-models.sh"
"$venv/bin/python" "$root/scripts/tokenizer-fixtures.py" "$root"
