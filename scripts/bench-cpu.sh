#!/usr/bin/env bash
# CPU benchmark: for SmolLM2 and Gemma 3, prompt and decode tokens/s measured three ways on the same
# tokens — raw candle-transformers 0.11.1 (the baseline), ult in-process, and ult through ultd over gRPC
# (timed at the client) — printed side by side with ult / baseline ratios.
#   scripts/bench-cpu.sh [PROMPT_TOKENS=128] [DECODE_TOKENS=64] [REPS=3]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${ULT_CACHE:-$HOME/.cache/ult}/target}
prompt=${1:-128}
decode=${2:-64}
reps=${3:-3}
work=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

scripts/fetch-models.sh >/dev/null
cargo build --release --locked -p ultd -p ult-client --examples --bins 2>&1 | tail -1
(cd bench/candle-baseline && cargo build --release 2>&1 | tail -1)
bin=$CARGO_TARGET_DIR/release

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== ult in-process"
"$bin/examples/bench" --device cpu --prompt "$prompt" --decode "$decode" --reps "$reps" --ids-out "$work" | tee "$work/inproc.txt"

echo "== baseline: raw candle-transformers 0.11.1"
for m in smollm2 gemma3; do
  case $m in
    smollm2) file=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf arch=llama ;;
    gemma3) file=models/gemma3/gemma-3-270m-q4_k_m.gguf arch=gemma3 ;;
  esac
  "$bin/candle-baseline" "$arch" "$file" "$work/$m.ids" "$decode" "$reps" cpu | sed "s/^{/{\"model\":\"$m\",/" | tee -a "$work/baseline.txt"
done

echo "== ult through ultd (gRPC, timed at the client)"
cat >"$work/models.toml" <<TOML
[daemon]
listen = "127.0.0.1:0"
socket = "off"
http = "off"
state_file = "off"
device = "cpu"
[models.smollm2]
path = "$root/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
kind = "completion"
context = 1024
[models.gemma3]
path = "$root/models/gemma3/gemma-3-270m-q4_k_m.gguf"
kind = "completion"
context = 1024
TOML
"$bin/ultd" --config "$work/models.toml" >"$work/ultd.out" 2>"$work/ultd.err" &
pid=$!
for _ in $(seq 1 300); do grep -q listening "$work/ultd.out" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/^ultd listening on \([^ ]*\).*/\1/p' "$work/ultd.out")
# The same words as the in-process prompt (the server tokenizes them; it reports the count).
python3 - "$work" "$prompt" <<'PY'
import sys, re
work, n = sys.argv[1], int(sys.argv[2])
src = open("daemon/examples/bench.rs").read()
text = re.search(r'pub const TEXT: &str = "(.*?)";', src, re.S).group(1).replace("\\\n", "")
words = (text + " ") * 4
# about 0.8 words per token for this text; the server reports the exact count
open(f"{work}/prompt.txt", "w").write(" ".join(words.split()[: int(n * 0.78)]))
PY
for m in smollm2 gemma3; do
  "$bin/examples/bench_grpc" --addr "$addr" --model "$m" --prompt-file "$work/prompt.txt" --decode "$decode" --reps "$reps" | tee -a "$work/grpc.txt"
done
echo "== through ultctl (one run each; rates as ultd reports them, plus ultctl's wall time)"
for m in smollm2 gemma3; do
  start=$(date +%s.%N)
  "$bin/ultctl" --addr "$addr" generate "$m" "$(cat "$work/prompt.txt")" --max-tokens "$decode" --ignore-eos --json >"$work/ultctl-$m.json"
  end=$(date +%s.%N)
  python3 - "$work/ultctl-$m.json" "$m" "$start" "$end" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["stats"]
print(f'{{"model":"{sys.argv[2]}","prompt_tokens":{s["prompt_tokens"]},"prompt_tok_s":{s["prompt_tokens_per_s"]:.2f},"decode_tok_s":{s["decode_tokens_per_s"]:.2f},"ultctl_wall_s":{float(sys.argv[4]) - float(sys.argv[3]):.2f}}}')
PY
done | tee "$work/ultctl.txt"

echo "== summary (tokens/s; ratio = ult / baseline)"
python3 - "$work" <<'PY'
import json, sys, glob
work = sys.argv[1]
def rows(name):
    out = {}
    for line in open(f"{work}/{name}.txt"):
        line = line.strip()
        if line.startswith("{"):
            d = json.loads(line)
            out[d["model"]] = d
    return out
base, inproc, grpc = rows("baseline"), rows("inproc"), rows("grpc")
print(f'{"model":<9} {"test":<8} {"candle":>9} {"ult":>9} {"ult/candle":>10} {"ult gRPC":>9} {"gRPC/in-process":>16}')
print("-" * 68)
for m in ["smollm2", "gemma3"]:
    for test, k, g in [("prompt", "prompt_tok_s", "client_prompt_tok_s"), ("decode", "decode_tok_s", "client_decode_tok_s")]:
        b, u, r = base[m][k], inproc[m][k], grpc[m][g]
        print(f"{m:<9} {test:<8} {b:>9.1f} {u:>9.1f} {u / b:>10.2f} {r:>9.1f} {r / u:>16.2f}")
PY
