#!/usr/bin/env bash
# GPU run, on a machine with an NVIDIA GPU, of the binaries scripts/build-cuda.sh bundles: correctness
# against the CPU, first-load time in a fresh process (empty and warm kernel cache), speed in-process and
# through ultd + gRPC, swap latency beside its transfer limit, device-memory governance under a ceiling, and
# a kernel-level breakdown of one SmolLM2 decode step with Nsight Compute.
#   scripts/bench-gpu.sh BIN_DIR MODELS_DIR OUT_DIR [PHASES]
# PHASES is a comma list of env,correct,firstload,speed,swap,govern,ncu (default: all). Writes one log per
# phase under OUT_DIR. The Llama-3-8B-shaped model is generated with scripts/synth-model (random weights:
# speed does not depend on weight values).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "$1" && pwd)
models=$(cd "$2" && pwd)
out=$3
phases=${4:-env,correct,firstload,speed,swap,govern,ncu}
mkdir -p "$out"
export LD_LIBRARY_PATH=${CUDA_LIBS:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export ULT_CACHE=${ULT_CACHE:-/tmp/ult-cache}
export ULT_LOG=${ULT_LOG:-ultd=info,warn}
smol=$models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
gemma=$models/gemma3/gemma-3-270m-q4_k_m.gguf
l8=$models/synth/llama3-8b-shape.Q4_0.gguf
device=${ULT_BENCH_DEVICE:-cuda:0}  # cpu: a dry run of this script's logic
prompt=${ULT_BENCH_PROMPT:-512}
decode=${ULT_BENCH_DECODE:-256}
reps=${ULT_BENCH_REPS:-3}
has() { [[ ",$phases," == *",$1,"* ]]; }
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done' EXIT

if [ ! -f "$l8" ]; then
  mkdir -p "$models/synth"
  python3 "$root/scripts/synth-model" --shape llama3-8b --out "$l8" --tokenizer-from "$smol"
fi

# Starts ultd on $1 (a models.toml); sets addr and pid.
start_ultd() {
  local log=$2
  "$bin/ultd" --config "$1" >"$log.out" 2>"$log.err" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 600); do grep -q listening "$log.out" 2>/dev/null && break; sleep 0.05; done
  addr=$(sed -n 's/^ultd listening on \([^ ]*\).*/\1/p' "$log.out")
}
stop_ultd() { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }
toml() { # ceiling, extra daemon lines
  cat <<TOML
[daemon]
listen = "127.0.0.1:0"
socket = "off"
http = "off"
state_file = "off"
device = "$device"
memory_ceiling = "$1"
headroom = "1GiB"
$2
[models.smollm2]
path = "$smol"
kind = "completion"
context = 1024
[models.gemma3]
path = "$gemma"
kind = "completion"
context = 1024
[models.llama3-8b-shape]
path = "$l8"
kind = "completion"
context = 1024
TOML
}

if has env; then
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    nproc
    python3 - <<'PY'
import torch, time
# Host-to-device bandwidth: the limit a model's transfer is measured against. ult reads weights from
# the page cache (pageable memory); pinned is the hardware's best case.
n = 1 << 30
for pinned in (False, True):
    h = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
    h.fill_(1)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    d.copy_(h); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        d.copy_(h)
    torch.cuda.synchronize()
    gbps = 5 * n / (time.perf_counter() - t) / 1e9
    print(f'{{"h2d_pinned":{str(pinned).lower()},"gb_per_s":{gbps:.2f}}}')
PY
  } 2>&1 | tee "$out/env.txt"
fi

if has correct; then
  "$bin/compare" --reference cpu --device "$device" --models-dir "$models" --tokens 32 2>&1 | tee "$out/correct.txt"
fi

if has firstload; then
  # A fresh process with an empty kernel cache (the first start on a machine): first with the warm-up off
  # (Candle compiles each module when an op first needs it: the baseline), then with it on; then a fresh
  # process with the cache the second one filled (every later start).
  toml "90%" "" >"$out/first.toml"
  for run in empty-cache-lazy empty-cache warm-cache; do
    [ "$run" = warm-cache ] || rm -rf "$ULT_CACHE/cuda-jit"
    warm=1; [ "$run" = empty-cache-lazy ] && warm=0
    t0=$(date +%s%N)
    ULT_CUDA_WARMUP=$warm ULT_LOG=ultd=debug,warn start_ultd "$out/first.toml" "$out/first-$run"
    t1=$(date +%s%N)
    "$bin/ultctl" --addr "$addr" --json load smollm2 >"$out/first-$run.json"
    t2=$(date +%s%N)
    stop_ultd
    python3 - "$run" "$t0" "$t1" "$t2" "$out/first-$run.json" "$out/first-$run.err" <<'PY' | tee -a "$out/firstload.txt"
import json, re, sys
run, t0, t1, t2, j, err = sys.argv[1:]
o = json.load(open(j))
jit = re.findall(r'ms=(\d+).*CUDA kernels ready|CUDA kernels ready.*ms=(\d+)', open(err).read())
jit = next((int(a or b) for a, b in jit), None)
print(json.dumps({"run": run, "process_to_listening_ms": (int(t1) - int(t0)) / 1e6,
                  "load_request_ms": (int(t2) - int(t1)) / 1e6, "ultd_load_ms": o["load_ms"],
                  "kernel_compile_ms": jit, "measured_bytes": o["measured_bytes"]}))
PY
  done
  grep -ho 'kernel module ready.*' "$out/first-empty-cache.err" | tee -a "$out/firstload.txt"
  du -sh "$ULT_CACHE/cuda-jit" | tee -a "$out/firstload.txt"
fi

if has speed; then
  {
    echo "== in-process (prompt $prompt, decode $decode, median of $reps)"
    "$bin/bench" --device "$device" --prompt "$prompt" --decode "$decode" --reps "$reps" --models smollm2,gemma3 --models-dir "$models" --gguf "llama3-8b-shape=$l8" --ids-out "$out"
    echo "== through ultd + gRPC"
    toml "90%" "" >"$out/speed.toml"
    start_ultd "$out/speed.toml" "$out/speed-ultd"
    python3 - "$out" "$root" "$prompt" <<'PY'
import sys, re
out, root = sys.argv[1], sys.argv[2]
src = open(f"{root}/daemon/examples/bench.rs").read()
text = re.search(r'pub const TEXT: &str = "(.*?)";', src, re.S).group(1).replace("\\\n", "")
words = (text + " ") * 4
open(f"{out}/prompt.txt", "w").write(" ".join(words.split()[: int(int(sys.argv[3]) * 0.78)]))
PY
    for m in smollm2 gemma3 llama3-8b-shape; do
      "$bin/bench_grpc" --addr "$addr" --model "$m" --prompt-file "$out/prompt.txt" --decode "$decode" --reps "$reps"
    done
    echo "== cancellation: client drops its stream after 16 tokens"
    for m in smollm2 llama3-8b-shape; do
      "$bin/bench_grpc" --addr "$addr" --model "$m" --cancel-after 16 --reps 5
    done
    stop_ultd
  } 2>&1 | tee "$out/speed.txt"
fi

if has swap; then
  # One resident model at a time: every request for the other is a swap (eviction, load, first token).
  toml "90%" "max_resident = 1" >"$out/swap.toml"
  start_ultd "$out/swap.toml" "$out/swap-ultd"
  {
    "$bin/bench_grpc" --addr "$addr" --model smollm2 --swap-with gemma3 --reps 5
    "$bin/bench_grpc" --addr "$addr" --model gemma3 --swap-with smollm2 --reps 5
    "$bin/bench_grpc" --addr "$addr" --model llama3-8b-shape --swap-with smollm2 --reps 3
    for f in "$smol" "$gemma" "$l8"; do echo "{\"file\":\"$(basename "$f")\",\"bytes\":$(stat -c %s "$f")}"; done
  } 2>&1 | tee "$out/swap.txt"
  stop_ultd
fi

if has govern; then
  # A device-memory ceiling that holds the 8B-shaped model or the small ones, not all: the policy must
  # evict, and nvidia-smi (sampled every 50 ms, independent of ult) must never see ult above the ceiling.
  toml "4600MiB" "" >"$out/govern.toml"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$out/govern-smi.txt" &
  smi=$!
  pids+=("$smi")
  sleep 0.5
  start_ultd "$out/govern.toml" "$out/govern-ultd"
  # ult's baseline: its idle process (CUDA context, cuBLAS, kernels), before any model.
  baseline=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  {
    "$bin/ultctl" --addr "$addr" --json status
    for m in smollm2 gemma3 llama3-8b-shape gemma3 smollm2 llama3-8b-shape; do
      "$bin/ultctl" --addr "$addr" --json generate "$m" "The capital of France is" --max-tokens 8 --ignore-eos | python3 -c 'import json,sys; s=json.load(sys.stdin)["stats"]; print(json.dumps({k: s.get(k) for k in ("model","completion_tokens","load_ms","time_to_first_token_ms")}))'
      "$bin/ultctl" --addr "$addr" --json status | python3 -c '
import json,sys
s=json.load(sys.stdin); d=s["daemon"]
print(json.dumps({"used":d.get("used_bytes"),"ceiling":d.get("ceiling_bytes"),"pool":d.get("pool_total_bytes"),"process":d.get("process_bytes"),
  "resident":{m["name"]:[m.get("predicted_bytes"),m.get("measured_bytes")] for m in s["models"] if m["state"] == "resident"}}))'
    done
  } 2>&1 | tee "$out/govern.txt"
  stop_ultd
  kill "$smi" 2>/dev/null
  python3 - "$out/govern-smi.txt" "$baseline" <<'PY' | tee -a "$out/govern.txt"
import sys
v = [int(x) for x in open(sys.argv[1]) if x.strip().isdigit()]
b = int(sys.argv[2])
print(f'{{"nvidia_smi_samples":{len(v)},"idle_ultd_mib":{b},"peak_mib":{max(v)},"peak_above_idle_ultd_mib":{max(v) - b},"ceiling_mib":4600,"held":{str(max(v) - b <= 4600).lower()}}}')
PY
fi

if has ncu; then
  # Every kernel of 4 SmolLM2 decode steps (after warm-up), timed on the GPU one at a time.
  # No cache flush between kernels: decode kernels run back to back on warm caches.
  ncu --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    "$bin/bench" --device cuda:0 --prompt 128 --decode 16 --reps 1 --models smollm2 --models-dir "$models" \
    --profile-decode 4 >"$out/ncu.csv" 2>"$out/ncu.err"
  python3 - "$out/ncu.csv" 4 <<'PY' | tee "$out/ncu.txt"
import csv, collections, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; rows = rows[1:]
ki, vi, ui = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
steps = int(sys.argv[2])
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
by = collections.defaultdict(lambda: [0, 0.0])
total = 0.0
for r in rows:
    us = float(r[vi].replace(",", "")) * scale.get(r[ui], 1.0)
    name = r[ki].split("(")[0].split("<")[0]
    by[name][0] += 1; by[name][1] += us; total += us
n = sum(c for c, _ in by.values())
print(f"kernels per decode step: {n / steps:.0f}; GPU time per step: {total / steps:.0f} us")
print(f"{'kernel':<40} {'per step':>8} {'us/step':>9} {'share':>6}")
for name, (c, us) in sorted(by.items(), key=lambda x: -x[1][1]):
    print(f"{name[:40]:<40} {c / steps:>8.1f} {us / steps:>9.1f} {us / total:>6.1%}")
PY
  grep -h "profiled" "$out/ncu.csv" | tee -a "$out/ncu.txt"
fi
