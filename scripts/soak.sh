#!/usr/bin/env bash
# Thrash under load, long: starts the release ultd on the three real models with a memory ceiling that
# fits SmolLM2 and Gemma 3 but not all three (so evictions and lazy loads never stop), drives it with
# CLIENTS concurrent clients for SECONDS (valid chat, completion and embedding requests, streams dropped on
# purpose, and the documented bad ones), and prints the report: sent, completed, failed by typed reason,
# lost, crashes, loads, evictions, the highest ledger / measured / RSS figures against the ceiling, and
# latency percentiles. Exits 1 if the daemon lost anything, crashed or passed the ceiling.
#   scripts/soak.sh [SECONDS=600] [CLIENTS=16]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-600}
clients=${2:-16}
[ -f models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || scripts/fetch-models.sh
cargo build --release --locked -q -p ultd --bin ultd -p ult-client --bin ultctl -p ult-tests --example soak
bin=${CARGO_TARGET_DIR:-$root/target}/release
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
m=$root/models
models() {
  cat <<TOML
[models.smollm2]
path = "$m/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
kind = "chat"
context = 2048
aliases = ["smol"]
[models.gemma3]
path = "$m/gemma3/gemma-3-270m-q4_k_m.gguf"
kind = "completion"
context = 2048
[models.minilm]
path = "$m/minilm"
kind = "embedding"
TOML
}
start() { # models.toml
  "$bin/ultd" --config "$1" >"$work/ultd.out" 2>"$work/ultd.err" &
  pid=$!
  for _ in $(seq 1 600); do grep -q listening "$work/ultd.out" 2>/dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^ultd listening on \([^ ]*\).*/\1/p' "$work/ultd.out")
  [ -n "$addr" ] || { cat "$work/ultd.err" >&2; exit 1; }
}
daemon() { printf '[daemon]\nlisten = "127.0.0.1:0"\nsocket = "off"\nhttp = "off"\nstate_file = "off"\nmax_requests_per_client = 64\n%s\n' "$1"; }
# The predictions, from a daemon that loads nothing.
{ daemon ""; models; } >"$work/probe.toml"
start "$work/probe.toml"
ceiling=$("$bin/ultctl" --addr "$addr" --json status | python3 -c '
import json, sys
s = json.load(sys.stdin)
p = {m["name"]: m["predicted_bytes"] for m in s["models"]}
print(p["smollm2"] + p["gemma3"] + 10_000_000)')
kill "$pid"; wait "$pid" 2>/dev/null || true
{ daemon "memory_ceiling = $ceiling
headroom = 0"; models; } >"$work/models.toml"
start "$work/models.toml"
echo "soak: $clients clients for ${secs}s against ultd pid $pid at $addr, ceiling $ceiling bytes ($(nproc) cores)" >&2
"$bin/examples/soak" --addr "$addr" --pid "$pid" --clients "$clients" --seconds "$secs"
