#!/usr/bin/env bash
# Concurrency benchmark: aggregate decode throughput and time to first token at several numbers of
# simultaneous streaming requests, ult's ultd against llama.cpp's llama-server (continuous batching on, one
# slot per concurrent request), on the same GGUF files, in the same run, on this machine's CPU. Both are
# driven over their OpenAI-compatible HTTP API by the same client (bench/concurrency.py): greedy,
# end-of-sequence ignored, a prompt unique per request. Prints a table with ult / llama.cpp ratios and each
# server's scaling against its own single-request figure.
#   scripts/bench-concurrency.sh [LEVELS=1,4,16,32] [MAX_TOKENS=128]
# Environment: PROMPT_WORDS (96), REPS (1; best aggregate kept), ULT_BENCH_THREADS (nproc; llama-server -t),
# ULT_BENCH_MODELS ("smollm2 gemma3"), ULT_BENCH_SKIP_ULT=1 / ULT_BENCH_SKIP_LLAMA=1 to run one side only,
# ULT_BENCH_ULTD=PATH to use a prebuilt ultd instead of building one, ULT_BENCH_OUT=DIR to keep the JSON
# lines and server logs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${ULT_CACHE:-$HOME/.cache/ult}/target}
levels=${1:-1,4,16,32}
max_tokens=${2:-128}
prompt_words=${PROMPT_WORDS:-96}
reps=${REPS:-1}
threads=${ULT_BENCH_THREADS:-$(nproc)}
models=${ULT_BENCH_MODELS:-smollm2 gemma3}
skip_ult=${ULT_BENCH_SKIP_ULT:-0}
skip_llama=${ULT_BENCH_SKIP_LLAMA:-0}
max_level=$(tr ',' '\n' <<<"$levels" | sort -n | tail -1)
# Context per slot: a generous bound on the prompt's tokens (about 1.3 per word, plus the request tag),
# the completion, and slack. llama-server divides -c evenly between its -np slots, each a multiple of 256.
slot_ctx=$(((2 * prompt_words + 16 + max_tokens + 64 + 255) / 256 * 256)) # llama.cpp pads slots to 256

work=$(mktemp -d)
pid=
stop_server() {
  if [ -n "${pid:-}" ]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
  fi
}
cleanup() {
  stop_server
  if [ -n "${ULT_BENCH_OUT:-}" ]; then mkdir -p "$ULT_BENCH_OUT" && cp -r "$work"/. "$ULT_BENCH_OUT"/; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# wait_http PORT PATH SECONDS: until GET http://127.0.0.1:PORT/PATH answers 200 (and, for llama.cpp's
# /health, status "ok"), while the server process lives.
wait_http() {
  local port=$1 path=$2 secs=$3 i
  for i in $(seq 1 $((secs * 5))); do
    kill -0 "$pid" 2>/dev/null || return 1
    if python3 - "$port" "$path" <<'PY' 2>/dev/null; then return 0; fi
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=2)
c.request("GET", sys.argv[2])
r = c.getresponse()
body = r.read()
sys.exit(0 if r.status == 200 and (b'"status"' not in body or b'"ok"' in body) else 1)
PY
    sleep 0.2
  done
  return 1
}
model_file() {
  case $1 in
    smollm2) echo "$root/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    gemma3) echo "$root/models/gemma3/gemma-3-270m-q4_k_m.gguf" ;; # fetch-models.sh joins the four parts
    *) echo "bench-concurrency: unknown model $1" >&2; return 1 ;;
  esac
}
client() { # label model port
  python3 bench/concurrency.py --url "http://127.0.0.1:$3" --model "$2" --label "$1" \
    --concurrency "$levels" --max-tokens "$max_tokens" --prompt-words "$prompt_words" --reps "$reps" \
    2>>"$work/client.err" | sed "s/^{/{\"model\":\"$2\",/" | tee -a "$work/results.jsonl" || true
}

scripts/fetch-models.sh >&2
if [ "$skip_llama" != 1 ]; then
  llama_bin=$(nice -n 10 scripts/build-llama-cpp.sh | tail -1)
fi
if [ "$skip_ult" != 1 ]; then
  if [ -n "${ULT_BENCH_ULTD:-}" ]; then
    ultd=$ULT_BENCH_ULTD
  else
    cargo build --release --locked -p ultd --bin ultd 2>&1 | tail -1
    ultd=$CARGO_TARGET_DIR/release/ultd
  fi
fi

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
echo "load:   $(uptime)"
echo "levels: $levels; max_tokens $max_tokens; prompt $prompt_words words; reps $reps; llama.cpp threads $threads"

for m in $models; do
  file=$(model_file "$m")
  if [ "$skip_llama" != 1 ]; then
    echo "== $m: llama.cpp llama-server"
    port=$(free_port)
    "$llama_bin/llama-server" -m "$file" --alias "$m" --host 127.0.0.1 --port "$port" \
      -np "$max_level" -c $((max_level * slot_ctx)) -t "$threads" -tb "$threads" --cont-batching \
      --no-webui >"$work/llama-$m.log" 2>&1 &
    pid=$!
    if wait_http "$port" /health 300; then
      client llama.cpp "$m" "$port"
    else
      echo "bench-concurrency: llama-server did not become healthy; its log ends:" >&2
      tail -20 "$work/llama-$m.log" >&2
    fi
    stop_server
  fi
  if [ "$skip_ult" != 1 ]; then
    echo "== $m: ult ultd"
    port=$(free_port)
    cat >"$work/models-$m.toml" <<TOML
[daemon]
listen = "127.0.0.1:0"
socket = "off"
state_file = "off"
device = "cpu"
http = "127.0.0.1:$port"
max_requests_per_client = $((max_level > 64 ? max_level : 64))
[models.$m]
path = "$file"
kind = "completion"
context = 1024
max_sequences = $max_level
TOML
    "$ultd" --config "$work/models-$m.toml" >"$work/ultd-$m.log" 2>&1 &
    pid=$!
    if wait_http "$port" /v1/models 120; then
      client ult "$m" "$port"
    else
      echo "bench-concurrency: ultd's HTTP API did not answer; its log ends:" >&2
      tail -20 "$work/ultd-$m.log" >&2
    fi
    stop_server
  fi
done

if [ -s "$work/client.err" ] && grep -q 'first_error\|failed' "$work/client.err"; then
  echo "== client errors (first lines)"
  grep 'first_error\|failed' "$work/client.err" | head -5
fi
echo "== summary (aggregate completion tokens/s over the wall time; scaling = tok/s at N / tok/s at 1)"
touch "$work/results.jsonl"
python3 - "$work/results.jsonl" "$models" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    if line.startswith("{"):
        d = json.loads(line)
        rows[(d["model"], d["label"], d["concurrency"])] = d
def f(v, w, p=1):
    return f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
print(f'{"model":<8} {"conc":>4} {"llama tok/s":>11} {"ult tok/s":>10} {"ult/llama":>9} {"llama scal":>10} '
      f'{"ult scal":>8} {"llama ttft p50/p99 ms":>22} {"ult ttft p50/p99 ms":>20} {"err l/u":>7}')
print("-" * 122)
for m in sys.argv[2].split():
    levels = sorted({c for (mm, _, c) in rows if mm == m})
    if not levels:
        continue
    base = {lab: rows.get((m, lab, levels[0]), {}).get("aggregate_tok_s") for lab in ("llama.cpp", "ult")}
    for c in levels:
        l, u = rows.get((m, "llama.cpp", c), {}), rows.get((m, "ult", c), {})
        lt, ut = l.get("aggregate_tok_s"), u.get("aggregate_tok_s")
        ratio = ut / lt if lt and ut is not None else None
        ls = lt / base["llama.cpp"] if lt is not None and base["llama.cpp"] else None
        us = ut / base["ult"] if ut is not None and base["ult"] else None
        def tt(d):
            a, b = d.get("ttft_p50_ms"), d.get("ttft_p99_ms")
            return f"{a:.0f}/{b:.0f}" if a is not None and b is not None else "-"
        err = f'{l.get("errors", "-")}/{u.get("errors", "-")}'
        print(f"{m:<8} {c:>4} {f(lt, 11)} {f(ut, 10)} {f(ratio, 9, 2)} {f(ls, 10, 2)} {f(us, 8, 2)} "
              f"{tt(l):>22} {tt(u):>20} {err:>7}")
short = [d for d in rows.values() if d.get("short_requests")]
for d in short:
    print(f'note: {d["label"]} {d["model"]} at {d["concurrency"]}: {d["short_requests"]} request(s) stopped '
          f'before max_tokens (min {d["min_tokens_per_request"]} tokens) - ignore_eos not honoured?')
PY
echo "load after: $(uptime)"
