#!/usr/bin/env bash
# What grammar-constrained decoding costs: SmolLM2 decode tokens/s through ultd (gRPC, ultctl) with free
# text and with a JSON schema (llguidance's mask each step), same build, same daemon, same run; prints
# the medians and their ratio.
#   scripts/bench-grammar.sh [REPS=5] [MAX_TOKENS=64]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${ULT_CACHE:-$HOME/.cache/ult}/target}
reps=${1:-5}
max=${2:-64}
work=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
scripts/fetch-models.sh >/dev/null
# The dev profile optimises the engine and every dependency (opt-level 3), as tests run it.
cargo build --locked -p ultd -p ult-client 2>&1 | tail -1
bin=$CARGO_TARGET_DIR/debug
cat >"$work/models.toml" <<TOML
[daemon]
listen = "127.0.0.1:0"
socket = "off"
http = "off"
ollama = "off"
state_file = "off"
device = "cpu"
[models.smollm2]
path = "$root/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
kind = "chat"
context = 1024
TOML
"$bin/ultd" --config "$work/models.toml" >"$work/ultd.out" 2>"$work/ultd.err" &
pid=$!
for _ in $(seq 1 300); do grep -q listening "$work/ultd.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^ultd listening on \([^ ]*\).*/\1/p' "$work/ultd.out")
# A schema whose answer runs long: a list of up to 20 landmarks of up to 60 characters each.
cat >"$work/schema.json" <<'JSON'
{"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
 "landmarks": {"type": "array", "maxItems": 20, "items": {"type": "string", "maxLength": 60}}},
 "required": ["city", "landmarks"], "additionalProperties": false}
JSON
prompt="List the landmarks of Paris."
run() { # label, extra args...
  local label=$1; shift
  "$bin/ultctl" --addr "$addr" --json generate smollm2 "$prompt" --chat --temperature 0 --max-tokens "$max" "$@" >/dev/null # warm
  for _ in $(seq 1 "$reps"); do
    "$bin/ultctl" --addr "$addr" --json generate smollm2 "$prompt" --chat --temperature 0 --max-tokens "$max" "$@" \
      | python3 -c "import json,sys; s=json.load(sys.stdin)['stats']; print('$label', s['completion_tokens'], s['decode_tokens_per_s'])"
  done
}
{ run text --ignore-eos; run schema --json-schema "$work/schema.json"; } | tee "$work/runs.txt"
python3 - "$work/runs.txt" "$(nproc)" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {k: statistics.median(float(r[2]) for r in rows if r[0] == k) for k in ("text", "schema")}
toks = {k: statistics.median(int(r[1]) for r in rows if r[0] == k) for k in ("text", "schema")}
print(f"machine: {sys.argv[2]} cores; SmolLM2 Q4_1 on CPU, greedy, dev profile")
print(f"free text     : {med['text']:.1f} decode tok/s (median of {sum(r[0]=='text' for r in rows)}, {toks['text']} tokens)")
print(f"JSON schema   : {med['schema']:.1f} decode tok/s (median of {sum(r[0]=='schema' for r in rows)}, {toks['schema']} tokens)")
print(f"schema / text : {med['schema'] / med['text']:.2f}x")
PY
