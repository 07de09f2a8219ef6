#!/usr/bin/env bash
# Writes the tiny model folders the engine's MLX tests compare against mlx-lm's fixtures, into
# ${ULT_MODELS_DIR:-models}/mlx, and checks each file against scripts/mlx/checkpoints.sha256:
#   hf-llama, hf-qwen3, hf-qwen3moe    bf16 Hugging Face checkpoints (scripts/mlx/gen-checkpoints.py, numpy)
#   mlx-<family>-q4, -q4g32, -q8       the same quantized by Apple's own `mlx_lm.convert -q` (4 bits in
#                                      groups of 64 or 32, 8 bits in groups of 64; Qwen3-MoE's routers
#                                      take mlx-lm's 8-bit override)
# mlx, mlx-lm and their dependencies (scripts/mlx/requirements.txt, pinned) live in a private venv under
# ${ULT_CACHE:-~/.cache/ult}/mlx-venv; mlx runs on the CPU here. Idempotent: folders that verify are kept.
#   scripts/mlx/make-checkpoints.sh            (--update rewrites the sha256 list: maintainers only)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
models=${ULT_MODELS_DIR:-$root/models}
out=$models/mlx
list=$root/scripts/mlx/checkpoints.sha256
reqs=$root/scripts/mlx/requirements.txt
venv=${ULT_CACHE:-$HOME/.cache/ult}/mlx-venv
want=$(sha256sum <"$reqs" | cut -d' ' -f1)
if [ "$(cat "$venv/.ready" 2>/dev/null)" != "$want" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --no-deps -r "$reqs"
  echo "$want" >"$venv/.ready"
fi
tok=$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$tok" ] || "$root/scripts/fetch-models.sh"
verify() { (cd "$out" && sha256sum --quiet --check "$list") >/dev/null 2>&1; }
if [ "${1:-}" != "--update" ] && verify; then
  echo "mlx: all $(wc -l <"$list") files present and verified in $out"
  exit 0
fi
rm -rf "$out" && mkdir -p "$out"
"$venv/bin/python" "$root/scripts/mlx/gen-checkpoints.py" --tokenizer-from "$tok" --out "$out" >/dev/null
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for spec in "llama q4 4 64" "qwen3 q4 4 64" "qwen3 q4g32 4 32" "qwen3 q8 8 64" "qwen3moe q4 4 64" "qwen3moe q8 8 64"; do
  read -r family name bits group <<<"$spec"
  (cd "$out" && "$venv/bin/mlx_lm.convert" --hf-path "hf-$family" --mlx-path "mlx-$family-$name" -q \
    --q-bits "$bits" --q-group-size "$group" >/dev/null)
done
if [ "${1:-}" = "--update" ]; then
  (cd "$out" && find . -type f | sort | xargs sha256sum) >"$list"
  echo "mlx: wrote $(wc -l <"$list") sha256 sums to $list"
  exit 0
fi
if ! verify; then
  (cd "$out" && sha256sum --check "$list" | grep -v ': OK$') >&2 || true
  echo "mlx: regenerated folders do not match $list (numpy, mlx or the generator changed?)" >&2
  exit 1
fi
echo "mlx: generated and verified $(wc -l <"$list") files in $out"
