#!/usr/bin/env bash
# Writes the tiny random-weight GGUFs of every model family (scripts/families/gen-ggufs.py) into
# ${ULT_MODELS_DIR:-models}/families and checks each against scripts/families/ggufs.sha256. What CI and
# scripts/test.sh run before the engine's family tests: the files are regenerated, not committed. numpy
# (pinned: its PCG64 stream and float rounding make the bytes) lives in a private venv under
# ${ULT_CACHE:-~/.cache/ult}/families-venv. Idempotent: files that already verify are not rewritten.
#   scripts/families/make-ggufs.sh            (--update rewrites the sha256 list: maintainers only)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
models=${ULT_MODELS_DIR:-$root/models}
out=$models/families
list=$root/scripts/families/ggufs.sha256
venv=${ULT_CACHE:-$HOME/.cache/ult}/families-venv
if ! "$venv/bin/python" -c 'import numpy; assert numpy.__version__ == "2.4.6"' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "numpy==2.4.6"
fi
tok=$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$tok" ] || "$root/scripts/fetch-models.sh"
mkdir -p "$out"
if [ "${1:-}" = "--update" ]; then
  "$venv/bin/python" "$root/scripts/families/gen-ggufs.py" --tokenizer-from "$tok" --out "$out" >/dev/null
  (cd "$out" && sha256sum -- *.gguf) >"$list"
  echo "families: wrote $(wc -l <"$list") sha256 sums to $list"
  exit 0
fi
if (cd "$out" && sha256sum --quiet --check "$list") >/dev/null 2>&1; then
  echo "families: all $(wc -l <"$list") files present and verified in $out"
  exit 0
fi
"$venv/bin/python" "$root/scripts/families/gen-ggufs.py" --tokenizer-from "$tok" --out "$out" >/dev/null
if ! (cd "$out" && sha256sum --quiet --check "$list"); then
  echo "families: regenerated files do not match $list (numpy or the generator changed?)" >&2
  exit 1
fi
echo "families: generated and verified $(wc -l <"$list") files in $out"
