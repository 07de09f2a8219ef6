#!/usr/bin/env bash
# Prefix-cache benchmark: time to first token of a request whose long prefix (about 2,000 tokens) an
# earlier request already computed, against that earlier (cold) request, for ult's ultd and llama.cpp's
# llama-server (one slot, prompt cache on: it reuses the slot's KV for the common prefix) on the same GGUF,
# in the same run, on this machine's CPU. Both are driven over /v1/completions by bench/prefix_cache.py.
#   scripts/bench-prefix-cache.sh [PREFIX_WORDS=1500] [REPS=3]
# Environment: ULT_BENCH_MODELS ("smollm2"), ULT_BENCH_THREADS (nproc), ULT_BENCH_ULTD=PATH (a prebuilt
# ultd), ULT_BENCH_SKIP_LLAMA=1 / ULT_BENCH_SKIP_ULT=1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${ULT_CACHE:-$HOME/.cache/ult}/target}
words=${1:-1500}
reps=${2:-3}
threads=${ULT_BENCH_THREADS:-$(nproc)}
models=${ULT_BENCH_MODELS:-smollm2}
work=$(mktemp -d)
pid=
stop_server() {
  if [ -n "${pid:-}" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
  fi
}
trap 'stop_server; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { # PORT PATH SECONDS
  local i
  for i in $(seq 1 $(($3 * 5))); do
    kill -0 "$pid" 2>/dev/null || return 1
    python3 -c "import http.client,sys; c=http.client.HTTPConnection('127.0.0.1',$1,timeout=2); c.request('GET','$2'); r=c.getresponse(); b=r.read(); sys.exit(0 if r.status==200 and (b'\"status\"' not in b or b'\"ok\"' in b) else 1)" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
model_file() {
  case $1 in
    smollm2) echo "$root/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    gemma3) echo "$root/models/gemma3/gemma-3-270m-q4_k_m.gguf" ;;
    *) echo "unknown model $1" >&2; return 1 ;;
  esac
}
scripts/fetch-models.sh >&2
[ "${ULT_BENCH_SKIP_LLAMA:-0}" = 1 ] || llama_bin=$(nice -n 10 scripts/build-llama-cpp.sh | tail -1)
if [ "${ULT_BENCH_SKIP_ULT:-0}" != 1 ]; then
  ultd=${ULT_BENCH_ULTD:-}
  if [ -z "$ultd" ]; then
    cargo build --release --locked -p ultd --bin ultd 2>&1 | tail -1
    ultd=$CARGO_TARGET_DIR/release/ultd
  fi
fi
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "prefix: $words words; reps $reps (the clients print the prompt tokens)"
for m in $models; do
  file=$(model_file "$m")
  if [ "${ULT_BENCH_SKIP_LLAMA:-0}" != 1 ]; then
    echo "== $m: llama.cpp llama-server"
    port=$(free_port)
    "$llama_bin/llama-server" -m "$file" --alias "$m" --host 127.0.0.1 --port "$port" -np 1 -c 4096 \
      -t "$threads" -tb "$threads" --no-webui >"$work/llama.log" 2>&1 &
    pid=$!
    wait_http "$port" /health 300 && python3 bench/prefix_cache.py --url "http://127.0.0.1:$port" \
      --model "$m" --label llama.cpp --prefix-words "$words" --reps "$reps" | tee -a "$work/results.jsonl"
    stop_server
  fi
  if [ "${ULT_BENCH_SKIP_ULT:-0}" != 1 ]; then
    echo "== $m: ult ultd"
    port=$(free_port)
    cat >"$work/models.toml" <<TOML
[daemon]
listen = "127.0.0.1:0"
socket = "off"
state_file = "off"
device = "cpu"
http = "127.0.0.1:$port"
[models.$m]
path = "$file"
kind = "completion"
context = 4096
max_sequences = 1
TOML
    "$ultd" --config "$work/models.toml" >"$work/ultd.log" 2>&1 &
    pid=$!
    wait_http "$port" /v1/models 120 && python3 bench/prefix_cache.py --url "http://127.0.0.1:$port" \
      --model "$m" --label ult --prefix-words "$words" --reps "$reps" | tee -a "$work/results.jsonl"
    stop_server
  fi
done
echo "== summary (median TTFT in ms; speedup = first / second)"
python3 - "$work/results.jsonl" <<'PY'
import json, sys
s = {d["label"]: d for d in map(json.loads, open(sys.argv[1])) if d.get("summary")}
for lab, d in s.items():
    print(f'{lab:<10} first {d["first_ttft_ms"]:8.0f}  second {d["second_ttft_ms"]:7.0f}  speedup {d["speedup"]:5.1f}x')
if "ult" in s and "llama.cpp" in s:
    print(f'ult cached TTFT / llama.cpp cached TTFT: {s["ult"]["second_ttft_ms"] / s["llama.cpp"]["second_ttft_ms"]:.2f}')
PY
