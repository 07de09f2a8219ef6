#!/usr/bin/env bash
# Ledger accuracy: starts ultd on models.toml, loads every model, and prints measured bytes (allocator
# delta of the load thread, after a warm-up pass) beside the prediction from file headers (steady bytes
# plus the KV budget; transient scratch excluded), with the error.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${ULT_CACHE:-$HOME/.cache/ult}/target}
scripts/fetch-models.sh >/dev/null
cargo build --release --locked -p ultd -p ult-client 2>&1 | tail -1
bin=$CARGO_TARGET_DIR/release
work=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin/ultd" --config models.toml --listen 127.0.0.1:0 --socket off --http off --state-file off --device "${1:-cpu}" >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 1 300); do grep -q listening "$work/out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^ultd listening on \([^ ]*\).*/\1/p' "$work/out")
printf '%-10s %8s %14s %14s %8s\n' model context measured predicted error
for m in smollm2 gemma3 minilm; do
  "$bin/ultctl" --addr "$addr" load "$m" --json >"$work/$m.json"
  ctx=$("$bin/ultctl" --addr "$addr" status --json | python3 -c "import json,sys; print([x for x in json.load(sys.stdin)['models'] if x['name']=='$m'][0]['context_tokens'])")
  python3 - "$work/$m.json" "$ctx" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
m, p = d["measured_bytes"], d["predicted_bytes"]
print(f'{d["model"]:<10} {sys.argv[2]:>8} {m:>14,} {p:>14,} {(p - m) / m * 100:>+7.2f}%')
PY
done
