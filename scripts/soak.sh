#!/usr/bin/env bash
# Thrash under load, long: the release ultd on the three real models with a memory ceiling that fits
# SmolLM2 and Gemma 3 but not all three (so evictions and lazy loads never stop), driven by CLIENTS
# concurrent clients for SECONDS (valid chat, completion and embedding requests, streams dropped on purpose,
# and the documented bad ones). Prints the report: sent, completed, failed by typed reason, lost, crashes,
# loads, evictions, the highest ledger / measured / RSS figures against the ceiling, latency percentiles.
# Exits 1 if the daemon lost anything, crashed or passed the ceiling. (tests/examples/soak.rs does the work.)
#   scripts/soak.sh [SECONDS=600] [CLIENTS=16] [--attacks]
# --attacks mixes in 3 MB prompts, streams that are never read and connection floods, and times Status.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ -f models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || scripts/fetch-models.sh
cargo build --release --locked -q -p ultd --bin ultd -p ult-tests --example soak
bin=${CARGO_TARGET_DIR:-$root/target}/release
"$bin/examples/soak" --ultd "$bin/ultd" --seconds "${1:-600}" --clients "${2:-16}" ${3:+"$3"}
