#!/usr/bin/env bash
# The mixture-of-experts benchmark beside llama.cpp, in two chained device calls (run from the repository
# root on the GPU machine, carrying .cuda-out/m: llama-src.tar.xz (the trimmed vendor/llama.cpp of the
# llama-cpp-python 0.3.36 sdist), ult-cuda-sm90.tar.xz (scripts/build-cuda.sh) and the family GGUF
# qwen3moe.Q4_K (scripts/families/make-ggufs.sh), whose tokenizer the benchmark file takes):
#   start  starts the CUDA build of llama-bench and llama-batched-bench in its own process session, checks
#          ult's MoE paths with `compare` on the family file meanwhile, writes the Qwen3-30B-A3B-shaped
#          random Q4_K file (scripts/synth-model), then waits for the build (so that nothing compiles
#          beside the benchmarks of the second call).
#   run    on that one file, one after the other: ult's `bench` (prompt 512, decode 128, batches of 1, 4
#          and 16), llama-bench (-fa 1, every layer on the GPU) and llama-batched-bench (1, 4 and 16
#          sequences of prompt 512 + 128 decoded).
# Everything it prints also lands in $OUT.
set -u
stage=$1
d=.cuda-out/m
source bench/h200/common.sh
case $stage in
start)
  start_llama_build "$d/llama-src.tar.xz" llama-bench llama-batched-bench
  xz -dc "$d/ult-cuda-sm90.tar.xz" | tar -xf - -C "$u/bin"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  {
    echo "== compare on CUDA (indexed experts below 64 rows), against the CPU f32 reference"
    timeout 100 "$u/bin/compare" --reference cpu --device cuda --models-dir /nonexistent --tokens 16 \
      --gguf "qwen3moe.Q4_K=$d/qwen3moe.Q4_K.gguf"
    t0=$(date +%s)
    python3 scripts/synth-model --shape qwen3-30b-a3b --out "$u/moe.gguf" --tokenizer-from "$d/qwen3moe.Q4_K.gguf"
    echo "written in $(($(date +%s) - t0)) s"
    ls -l "$u/moe.gguf"; sha256sum "$u/moe.gguf" | cut -c1-16
  } 2>&1 | tee "$OUT/moe-start.txt"
  while [ ! -f "$u/llama-build.rc" ]; do sleep 2; done
  echo "llama.cpp build: rc $(cat "$u/llama-build.rc") in $(($(date +%s) - $(cat "$u/llama-build.t0"))) s" | tee "$OUT/llama-build.txt"
  tail -3 "$u/llama-build.log" >>"$OUT/llama-build.txt"
  ;;
run)
  b=$u/llama-build/bin
  {
    echo "== ult bench (stacked experts: indexed below 64 rows, copied out per expert at 64 or more)"
    timeout 200 "$u/bin/bench" --device cuda --models none --gguf "qwen3-30b-a3b=$u/moe.gguf" --prompt 512 \
      --decode 128 --reps 3 --batch 1,4,16 2>&1 | tail -8
    echo "== llama-bench (-fa 1, all layers on the GPU)"
    timeout 150 "$b/llama-bench" -m "$u/moe.gguf" -p 512 -n 128 -ngl 99 -fa 1 -r 3 2>&1 | grep -v "^ggml\|^llama\|^load" | tail -6
    echo "== llama-batched-bench (prompt 512, 128 decoded per sequence)"
    timeout 150 "$b/llama-batched-bench" -m "$u/moe.gguf" -c 16384 -b 2048 -ub 512 -npp 512 -ntg 128 -npl 1,4,16 \
      -ngl 99 -fa on 2>&1 | grep "^|" | tail -6
  } 2>&1 | tee "$OUT/moe-run.txt"
  ;;
esac
