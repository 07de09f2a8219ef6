#!/usr/bin/env bash
# Runs every libFuzzer target in fuzz/ for SECONDS each (default 60) on the committed corpus, with cargo-fuzz
# installed into ult's cache if missing. Stable Rust: RUSTC_BOOTSTRAP=1 admits the sanitizer flags cargo-fuzz
# passes. New inputs that reach new coverage go to a scratch corpus (fuzz/corpus stays as committed unless
# you copy them in); a crash leaves its input under fuzz/artifacts/<target>/ and fails the script.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf models_toml request)
cache=${ULT_CACHE:-$HOME/.cache/ult}
export CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
bin=$cache/cargo-bin
if [ ! -x "$bin/bin/cargo-fuzz" ]; then
  cargo install --locked --quiet --root "$bin" cargo-fuzz@0.13.1
fi
export PATH=$bin/bin:$PATH RUSTC_BOOTSTRAP=1 ULT_MODELS_DIR=$root/models
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$cache/target-fuzz}
[ -f models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || scripts/fetch-models.sh
status=0
for t in "${targets[@]}"; do
  scratch=$cache/fuzz-corpus/$t
  mkdir -p "$scratch"
  log=$cache/fuzz-$t.log
  # -rss_limit_mb: an input that makes a parser allocate gigabytes is a finding, as a crash is.
  if cargo fuzz run --fuzz-dir fuzz "$t" "$scratch" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
    status=1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
  echo "$t: ${secs}s, ${execs:-?} executions (${rate:-?}/s), ${cov:-cov ?}, corpus $(ls "$scratch" | wc -l) files: $result (log $log)"
done
exit $status
