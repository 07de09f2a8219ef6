#!/usr/bin/env bash
# GPU (H200) side-by-side of ult's ultd and llama.cpp's llama-server on the same GGUF, in the same run:
#   1. continuous batching (issue 9): aggregate decode throughput (completion tokens / wall time) and TTFT
#      p50 at several numbers of simultaneous streaming requests, driven by bench/concurrency.py (greedy,
#      end-of-sequence ignored, a prompt unique per request). ultd: max_sequences = max level, context 1024;
#      llama-server: -np <max level> --cont-batching -fa on -ngl 99.
#   2. prefix cache (issue 12): TTFT of a second request sharing a ~2,000-token prefix with a first one,
#      against the first, driven by bench/prefix_cache.py through bench/h200/prefix_cache_eos.py (which
#      adds ignore_eos: SmolLM2 answers most of its prompts with end-of-sequence first, leaving no TTFT). ultd: prefix cache on (its default), context
#      4096, max_sequences 1; llama-server: -np 1 -c 4096 (prompt cache on by default) -fa on -ngl 99.
# The GPU counterpart of scripts/bench-concurrency.sh and scripts/bench-prefix-cache.sh (their logic, their
# clients); it builds nothing: the binaries come from scripts/build-cuda.sh (ultd) and a CUDA build of
# llama.cpp's llama-server (see bench/h200/RESULTS.md for the cmake line).
#   scripts/bench-h200.sh BIN_DIR MODELS LLAMA_BIN [OUT_DIR]
# BIN_DIR holds ultd; MODELS is a models folder (smollm2/SmolLM2-135M-Instruct.Q4_1.gguf under it) or a
# .gguf file; LLAMA_BIN holds llama-server. OUT_DIR (default: a temporary folder) keeps the JSON lines,
# the server logs and summary.txt.
# Environment: PHASES (concurrency,prefix), LEVELS (1,4,16,32), MAX_TOKENS (128), PROMPT_WORDS (96),
# REPS (3; best aggregate kept per level), PREFIX_WORDS (1850), PREFIX_REPS (5), DEVICE (cuda; "cpu" for a
# dry run of this script's logic), NGL (99), CUDA_LIBS (the CUDA 13 libraries ultd loads: cuBLAS, cuRAND,
# NVRTC; default the device image's torch wheels), LLAMA_LIBS (a folder put first on llama-server's library
# path, if its CUDA libraries are not found by default), ULT_CACHE (ultd's kernel cache, /tmp/ult-cache).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ $# -ge 3 ] || { sed -n '2,23p' "$0" >&2; exit 2; }
bin=$(cd "$1" && pwd)
if [ -f "$2" ]; then model=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); else model=$(cd "$2" && pwd)/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; fi
llama_bin=$(cd "$3" && pwd)
out=${4:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
phases=${PHASES:-concurrency,prefix}
levels=${LEVELS:-1,4,16,32}
max_tokens=${MAX_TOKENS:-128}
prompt_words=${PROMPT_WORDS:-96}
reps=${REPS:-3}
prefix_words=${PREFIX_WORDS:-1850} # 2,007 prompt tokens with SmolLM2's tokenizer
prefix_reps=${PREFIX_REPS:-5}
device=${DEVICE:-cuda}
ngl=${NGL:-99}
cuda_libs=${CUDA_LIBS:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib}
llama_libs=${LLAMA_LIBS:-}
export ULT_CACHE=${ULT_CACHE:-/tmp/ult-cache}
export ULT_LOG=${ULT_LOG:-ultd=info,warn}
max_level=$(tr ',' '\n' <<<"$levels" | sort -n | tail -1)
# As in bench-concurrency.sh: a slot's context bounds the prompt's tokens, the completion and slack.
slot_ctx=$(((2 * prompt_words + 16 + max_tokens + 64 + 255) / 256 * 256))
m=smollm2
[ -f "$model" ] || { echo "bench-h200: no model at $model" >&2; exit 1; }
skip_ult=${SKIP_ULT:-0}
skip_llama=${SKIP_LLAMA:-0}
[ "$skip_ult" = 1 ] || [ -x "$bin/ultd" ] || { echo "bench-h200: no ultd in $bin" >&2; exit 1; }
[ -x "$llama_bin/llama-server" ] || { echo "bench-h200: no llama-server in $llama_bin" >&2; exit 1; }
has() { [[ ",$phases," == *",$1,"* ]]; }

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
trap stop_server EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { # PORT PATH SECONDS: until GET answers 200 (and llama.cpp's /health says "ok"), while $pid lives
  local i
  for i in $(seq 1 $(($3 * 5))); do
    kill -0 "$pid" 2>/dev/null || return 1
    python3 -c "import http.client,sys; c=http.client.HTTPConnection('127.0.0.1',$1,timeout=2); c.request('GET','$2'); r=c.getresponse(); b=r.read(); sys.exit(0 if r.status==200 and (b'\"status\"' not in b or b'\"ok\"' in b) else 1)" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
# One short greedy completion, so that model load and first-use kernel compilation stay out of the
# prefix-cache figures (bench/concurrency.py warms up by itself).
warm() { # PORT
  python3 - "$1" "$m" <<'PY'
import http.client, json, sys, time
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=600)
t = time.perf_counter()
c.request("POST", "/v1/completions", json.dumps({"model": sys.argv[2], "prompt": "Warm-up: the cat sat on",
          "max_tokens": 8, "temperature": 0}), {"Content-Type": "application/json"})
r = c.getresponse(); body = r.read()
print(f"warm-up: HTTP {r.status} in {time.perf_counter() - t:.2f} s", file=sys.stderr)
sys.exit(0 if r.status == 200 else 1)
PY
}
start_llama() { # LOG ARGS...
  local log=$1; shift
  port=$(free_port)
  LD_LIBRARY_PATH=$llama_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$llama_bin/llama-server" -m "$model" --alias "$m" --host 127.0.0.1 --port "$port" -ngl "$ngl" -fa on \
    --no-webui "$@" >"$log" 2>&1 &
  pid=$!
  wait_http "$port" /health 300 || { echo "bench-h200: llama-server did not become healthy:" >&2; tail -20 "$log" >&2; return 1; }
}
start_ultd() { # TOML LOG CONTEXT MAX_SEQUENCES
  port=$(free_port)
  cat >"$1" <<TOML
[daemon]
listen = "127.0.0.1:0"
socket = "off"
state_file = "off"
device = "$device"
http = "127.0.0.1:$port"
max_requests_per_client = $((max_level > 64 ? max_level : 64))
[models.$m]
path = "$model"
kind = "completion"
context = $3
max_sequences = $4
TOML
  LD_LIBRARY_PATH=$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$bin/ultd" --config "$1" >"$2" 2>&1 &
  pid=$!
  wait_http "$port" /v1/models 120 || { echo "bench-h200: ultd's HTTP API did not answer:" >&2; tail -20 "$2" >&2; return 1; }
}

{
  echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "gpu:     $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo none)"
  echo "host:    $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "model:   $model ($(stat -c %s "$model") bytes)"
  echo "llama:   $("$llama_bin/llama-server" --version 2>&1 | grep -m1 version)"
  echo "device:  $device; levels $levels; max_tokens $max_tokens; prompt $prompt_words words; reps $reps; prefix $prefix_words words x $prefix_reps"
} | tee "$out/machine.txt"

if has concurrency; then
  client() { # LABEL
    python3 bench/concurrency.py --url "http://127.0.0.1:$port" --model "$m" --label "$1" \
      --concurrency "$levels" --max-tokens "$max_tokens" --prompt-words "$prompt_words" --reps "$reps" \
      2>>"$out/concurrency-client.err" | sed "s/^{/{\"model\":\"$m\",/" | tee -a "$out/concurrency.jsonl" || true
  }
  echo "== concurrency: llama.cpp llama-server -np $max_level -c $((max_level * slot_ctx)) --cont-batching -fa on -ngl $ngl"
  [ "$skip_llama" = 1 ] || { start_llama "$out/llama-concurrency.log" -np "$max_level" -c $((max_level * slot_ctx)) --cont-batching && client llama.cpp; }
  stop_server
  [ "$skip_ult" = 1 ] || echo "== concurrency: ult ultd (device $device, max_sequences $max_level, context 1024)"
  [ "$skip_ult" = 1 ] || { start_ultd "$out/ultd-concurrency.toml" "$out/ultd-concurrency.log" 1024 "$max_level" && client ult; }
  stop_server
fi

if has prefix; then
  echo "== prefix: llama.cpp llama-server -np 1 -c 4096 -fa on -ngl $ngl"
  [ "$skip_llama" = 1 ] || { start_llama "$out/llama-prefix.log" -np 1 -c 4096 && warm "$port" &&
    python3 bench/h200/prefix_cache_eos.py --url "http://127.0.0.1:$port" --model "$m" --label llama.cpp \
      --prefix-words "$prefix_words" --reps "$prefix_reps" | tee -a "$out/prefix.jsonl"; }
  stop_server
  echo "== prefix: ult ultd (device $device, context 4096, max_sequences 1, prefix cache default)"
  [ "$skip_ult" = 1 ] || { start_ultd "$out/ultd-prefix.toml" "$out/ultd-prefix.log" 4096 1 && warm "$port" &&
    python3 bench/h200/prefix_cache_eos.py --url "http://127.0.0.1:$port" --model "$m" --label ult \
      --prefix-words "$prefix_words" --reps "$prefix_reps" | tee -a "$out/prefix.jsonl"; }
  stop_server
fi

python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, os, sys
out = sys.argv[1]
def f(v, w, p=1):
    return f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
path = os.path.join(out, "concurrency.jsonl")
if os.path.exists(path):
    rows = {}
    for line in open(path):
        if line.startswith("{"):
            d = json.loads(line)
            rows[(d["label"], d["concurrency"])] = d
    levels = sorted({c for (_, c) in rows})
    print("== continuous batching: aggregate completion tokens/s over wall time; scaling = tok/s at N / tok/s at 1")
    print(f'{"conc":>4} {"llama tok/s":>11} {"ult tok/s":>10} {"ult/llama":>9} {"llama scal":>10} {"ult scal":>8} '
          f'{"llama ttft p50 ms":>17} {"ult ttft p50 ms":>15} {"err l/u":>7}')
    base = {lab: rows.get((lab, levels[0]), {}).get("aggregate_tok_s") if levels else None for lab in ("llama.cpp", "ult")}
    for c in levels:
        l, u = rows.get(("llama.cpp", c), {}), rows.get(("ult", c), {})
        lt, ut = l.get("aggregate_tok_s"), u.get("aggregate_tok_s")
        ratio = ut / lt if lt and ut is not None else None
        ls = lt / base["llama.cpp"] if lt is not None and base["llama.cpp"] else None
        us = ut / base["ult"] if ut is not None and base["ult"] else None
        print(f'{c:>4} {f(lt, 11)} {f(ut, 10)} {f(ratio, 9, 2)} {f(ls, 10, 2)} {f(us, 8, 2)} '
              f'{f(l.get("ttft_p50_ms"), 17)} {f(u.get("ttft_p50_ms"), 15)} {str(l.get("errors", "-")) + "/" + str(u.get("errors", "-")):>7}')
    for d in rows.values():
        if d.get("short_requests"):
            print(f'note: {d["label"]} at {d["concurrency"]}: {d["short_requests"]} request(s) stopped before max_tokens')
        if d.get("first_error"):
            print(f'note: {d["label"]} at {d["concurrency"]}: {d["errors"]} error(s), first: {d["first_error"]}')
path = os.path.join(out, "prefix.jsonl")
if os.path.exists(path):
    s = {d["label"]: d for d in map(json.loads, (l for l in open(path) if l.startswith("{"))) if d.get("summary")}
    print("== prefix cache: median TTFT in ms; speedup = first / second")
    for lab, d in s.items():
        print(f'{lab:<10} first {d["first_ttft_ms"]:8.1f}  second {d["second_ttft_ms"]:7.1f}  speedup {d["speedup"]:5.1f}x')
    if "ult" in s and "llama.cpp" in s:
        print(f'ult cached TTFT / llama.cpp cached TTFT: {s["ult"]["second_ttft_ms"] / s["llama.cpp"]["second_ttft_ms"]:.2f}')
        print(f'ult cold TTFT / llama.cpp cold TTFT: {s["ult"]["first_ttft_ms"] / s["llama.cpp"]["first_ttft_ms"]:.2f}')
PY
echo "results in $out"
