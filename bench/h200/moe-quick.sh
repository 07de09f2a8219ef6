#!/usr/bin/env bash
# One short GPU call for the mixture-of-experts path (run from the repository root on the device, carrying
# .cuda-out/m: ult-cuda-sm90.tar.xz from scripts/build-cuda.sh and the family GGUFs qwen3moe.Q4_K,
# qwen3moe.Q8_0 and deepseek2-lite.Q4_K from scripts/families/make-ggufs.sh):
#   1. `compare` on those files on CUDA against the CPU f32 reference: by default (the indexed expert
#      kernel for K-quant stacks, below 64 rows a step), with ULT_MOE_ROWS=1 (experts copied out of the
#      stacks on every step), and with ULT_MOE=each (one Candle matmul per expert);
#   2. a Qwen3-30B-A3B-shaped random Q4_K file (scripts/synth-model, its tokenizer metadata taken from a
#      family file) through `bench`: the default (batches 1, 4, 16), then ULT_MOE=each.
# SKIP_EACH=1 leaves out the ULT_MOE=each runs. No llama.cpp here (session.sh's moe stage runs it beside, when a lease has the time to build it).
set -u
d=.cuda-out/m
source bench/h200/common.sh
xz -dc "$d/ult-cuda-sm90.tar.xz" | tar -xf - -C "$u/bin"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
{
  echo "== compare on CUDA, indexed experts"
  timeout 100 "$u/bin/compare" --reference cpu --device cuda --models-dir /nonexistent --tokens 16 \
    --gguf "qwen3moe.Q4_K=$d/qwen3moe.Q4_K.gguf,qwen3moe.Q8_0=$d/qwen3moe.Q8_0.gguf,ds-lite.Q4_K=$d/deepseek2-lite.Q4_K.gguf"
  echo "== compare on CUDA, ULT_MOE_ROWS=1 (every step copies its experts out of the stacks)"
  ULT_MOE_ROWS=1 timeout 60 "$u/bin/compare" --reference cpu --device cuda --models-dir /nonexistent --tokens 16 \
    --gguf "qwen3moe.Q4_K=$d/qwen3moe.Q4_K.gguf"
  [ -n "${SKIP_EACH:-}" ] || echo "== compare on CUDA, ULT_MOE=each"
  [ -n "${SKIP_EACH:-}" ] || ULT_MOE=each timeout 60 "$u/bin/compare" --reference cpu --device cuda --models-dir /nonexistent --tokens 16 \
    --gguf "qwen3moe.Q4_K=$d/qwen3moe.Q4_K.gguf,qwen3moe.Q8_0=$d/qwen3moe.Q8_0.gguf,ds-lite.Q4_K=$d/deepseek2-lite.Q4_K.gguf"
} 2>&1 | tee "$OUT/gpu-moe-compare.txt"
{
  t0=$(date +%s)
  python3 scripts/synth-model --shape qwen3-30b-a3b --out "$u/moe.gguf" --tokenizer-from "$d/qwen3moe.Q4_K.gguf"
  echo "written in $(($(date +%s) - t0)) s"
  echo "== ult bench, stacked experts (indexed below 64 rows, copied out per expert at 64 or more)"
  timeout 150 "$u/bin/bench" --device cuda --models none --gguf "qwen3-30b-a3b=$u/moe.gguf" --prompt 512 --decode 128 \
    --reps 2 --batch 1,4,16 2>&1 | tail -8
  [ -n "${SKIP_EACH:-}" ] || echo "== ult bench, ULT_MOE=each"
  [ -n "${SKIP_EACH:-}" ] || ULT_MOE=each timeout 80 "$u/bin/bench" --device cuda --models none --gguf "qwen3-30b-a3b=$u/moe.gguf" --prompt 512 \
    --decode 32 --reps 1 2>&1 | tail -4
} 2>&1 | tee "$OUT/gpu-moe-bench.txt"
