#!/usr/bin/env bash
# The main job: fetch the default models if missing, build ultd and ultctl, start ultd on models.toml and
# show it serving through ultctl. ultd then keeps running in the foreground (Ctrl-C stops it);
# ULT_DEMO_EXIT=1 stops it after the demonstration instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${ULT_CACHE:-$HOME/.cache/ult}/target}
export ULT_ADDR=${ULT_ADDR:-127.0.0.1:50051}

scripts/fetch-models.sh
echo "building ultd and ultctl (release; the first build takes several minutes)…"
cargo build --release --locked --quiet -p ultd -p ult-client
bin=$CARGO_TARGET_DIR/release
log=${ULT_CACHE:-$HOME/.cache/ult}/ultd.log
mkdir -p "$(dirname "$log")"

"$bin/ultd" --config models.toml --listen "$ULT_ADDR" 2>"$log" &
pid=$!
stop_ultd() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  printf '\nultd stopped. Its log is %s\n' "$log"
}
trap stop_ultd EXIT INT TERM
# ultd prints its address once it is bound; until then ultctl cannot connect.
for _ in $(seq 1 300); do
  "$bin/ultctl" status >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { echo "ultd exited; see $log" >&2; tail -20 "$log" >&2; exit 1; }
  sleep 0.1
done

# Each command is shown as it can be pasted back (quoted), with ultctl on PATH as below.
export PATH="$bin:$PATH"
say() { printf '\n$'; printf ' %q' "$@"; printf '\n'; "$@"; }
say ultctl status
say ultctl generate chat "What is the capital of France?" --system "You are a helpful assistant."
say ultctl generate gemma3 "The capital of France is" --max-tokens 24
say ultctl embed minilm "A cat sits on the mat" "A kitten rests on a rug" "Stock markets fell sharply"
say ultctl status

if [ "${ULT_DEMO_EXIT:-0}" = 1 ]; then
  exit 0
fi
printf '\nultd is serving on %s (pid %s, log %s). Press Ctrl-C to stop it.\n' "$ULT_ADDR" "$pid" "$log"
printf 'To use ultctl from another shell: export PATH=%q:"$PATH"\n' "$bin"
wait "$pid"
