#!/usr/bin/env bash
# One GPU lease in two chained calls (run from the repository root on the device; each call's files come in
# the carried folder .cuda-out/<stage>, since one call carries at most 64 MiB and the model alone is 98 MB):
#   start  .cuda-out/a: llama-src.tar.xz (the trimmed vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist),
#          ult-cuda-sm90.tar.xz (scripts/build-cuda.sh) and model.part-aa. Starts the CUDA build of
#          llama-server in its own process session, unpacks ult, and runs the engine's GPU unit tests (ult's
#          paged-attention kernels against the portable Candle ops, and chunking invariance).
#   run    .cuda-out/b: model.part-ab; joins and checks the model (bench/h200/parts/model.sha256), then what
#          DO lists (default tests,correctness,batching,portable): correctness = `compare` (logits against
#          the f32 reference), with tests also the engine's batched = alone tests on CUDA (SmolLM2); diag = the same tests
#          with ULT_ATTENTION=portable; depth = `bench` prompt and decode at 512 (and batches of 1/4/16/32)
#          and 4,000 positions, kernels and portable; after llama-server is built: batching = scripts/bench-h200.sh (both phases, both
#          servers); prefix = its prefix phase alone; portable = its concurrency phase again for ult with
#          ULT_ATTENTION=portable (Candle's ops, the previous path) for the A/B; families = `compare` on
#          the family GGUFs (written here by scripts/families/gen-ggufs.py) on CUDA, the MoE ones also with
#          ULT_MOE=each; moe = a Qwen3-30B-A3B-shaped random Q4_K file (scripts/synth-model), ult's `bench`
#          (indexed experts, then ULT_MOE=each) beside llama-bench and llama-batched-bench on it.
# Everything it prints also lands in $OUT (logs and summaries).
set -u
stage=$1
source bench/h200/common.sh
mkdir -p "$u/models/smollm2"
case $stage in
start)
  d=.cuda-out/a
  cat "$d/model.part-aa" >"$u/model.gguf"
  start_llama_build "$d/llama-src.tar.xz" llama-server llama-bench llama-batched-bench
  xz -dc "$d/ult-cuda-sm90.tar.xz" | tar -xf - -C "$u/bin"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  nvcc --version | tail -1; nproc
  set -o pipefail
  "$u/bin/engine-lib-tests" cuda_kernels --test-threads 1 2>&1 | tee "$OUT/gpu-unit-tests.txt"
  ;;
run)
  cat .cuda-out/b/model.part-ab >>"$u/model.gguf"
  mv "$u/model.gguf" "$u/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  sum=$(sha256sum <"$u/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)
  [ "$sum" = "$(cat bench/h200/parts/model.sha256)" ] || { echo "model checksum $sum differs" >&2; exit 1; }
  do=",${DO:-tests,correctness,batching,portable},"
  has() { [[ $do == *",$1,"* ]]; }
  batching() { ULT_TEST_DEVICE=cuda ULT_MODELS_DIR=$u/models timeout 200 "$u/bin/engine-batching-tests" smollm2 --test-threads 1; }
  if has correctness; then
    {
      has tests && { echo "== engine batched = alone on CUDA (SmolLM2)"; batching; }
      echo "== compare (logits against the f32 reference)"
      timeout 120 "$u/bin/compare" --reference cpu --device cuda --models-dir "$u/models" --tokens 32
    } 2>&1 | tee "$OUT/gpu-correctness.txt"
  fi
  if has diag; then
    # Which op makes a batch differ from alone on CUDA: with Candle's portable attention too?
    { echo "== engine batched = alone on CUDA, ULT_ATTENTION=portable"; ULT_ATTENTION=portable batching; } 2>&1 | tee "$OUT/gpu-diag.txt"
  fi
  if has depth; then
    for a in ${DEPTH_MODES:-kernels portable}; do
      for p in 512 4000; do
        echo "== bench: attention $a, prompt $p, decode 128"
        if [ $a = portable ]; then export ULT_ATTENTION=portable; else unset ULT_ATTENTION; fi
        batch=1; [ $p = 512 ] && batch=1,4,16,32
        timeout 120 "$u/bin/bench" --device cuda --models smollm2 --models-dir "$u/models" --prompt $p --decode 128 --reps 3 --batch $batch 2>&1 | tail -8
      done
    done 2>&1 | tee "$OUT/gpu-depth.txt"
    unset ULT_ATTENTION
  fi
  if has families; then
    {
      python3 scripts/families/gen-ggufs.py --tokenizer-from "$u/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
        --out "$u/families" >/dev/null
      f=$u/families
      list=qwen3moe.Q4_K=$f/qwen3moe.Q4_K.gguf,qwen3moe.Q8_0=$f/qwen3moe.Q8_0.gguf,ds-lite.Q4_K=$f/deepseek2-lite.Q4_K.gguf
      list=$list,ds-lite.Q8_0=$f/deepseek2-lite.Q8_0.gguf,ds-v3.F16=$f/deepseek2.F16.gguf,qwen3.Q4_K=$f/qwen3.Q4_K.gguf
      echo "== compare on the family GGUFs (indexed experts on CUDA)"
      timeout 150 "$u/bin/compare" --reference cpu --device cuda --models-dir /nonexistent --tokens 16 --gguf "$list"
      echo "== the same MoE files with ULT_MOE=each (one Candle matmul per expert)"
      ULT_MOE=each timeout 100 "$u/bin/compare" --reference cpu --device cuda --models-dir /nonexistent --tokens 16 \
        --gguf "qwen3moe.Q4_K=$f/qwen3moe.Q4_K.gguf,ds-lite.Q4_K=$f/deepseek2-lite.Q4_K.gguf"
    } 2>&1 | tee "$OUT/gpu-families.txt"
  fi
  if has moe; then
    {
      t0=$(date +%s)
      python3 scripts/synth-model --shape qwen3-30b-a3b --out "$u/moe.gguf" \
        --tokenizer-from "$u/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
      echo "written in $(($(date +%s) - t0)) s"
      echo "== ult bench, indexed experts"
      timeout 200 "$u/bin/bench" --device cuda --models none --gguf "qwen3-30b-a3b=$u/moe.gguf" --prompt 512 --decode 128 \
        --reps 3 --batch 1,4,16 2>&1 | tail -8
      echo "== ult bench, ULT_MOE=each"
      ULT_MOE=each timeout 120 "$u/bin/bench" --device cuda --models none --gguf "qwen3-30b-a3b=$u/moe.gguf" --prompt 512 \
        --decode 64 --reps 1 2>&1 | tail -4
    } 2>&1 | tee "$OUT/gpu-moe-ult.txt"
  fi
  while [ ! -f "$u/llama-build.rc" ]; do sleep 2; done
  echo "llama-server build: rc $(cat "$u/llama-build.rc") in $(($(date +%s) - $(cat "$u/llama-build.t0"))) s" | tee "$OUT/llama-build.txt"
  tail -5 "$u/llama-build.log" >>"$OUT/llama-build.txt"
  if has moe; then
    {
      b=$u/llama-build/bin
      echo "== llama-bench (-fa 1, all layers on the GPU)"
      timeout 150 "$b/llama-bench" -m "$u/moe.gguf" -p 512 -n 128 -ngl 99 -fa 1 -r 3 2>&1 | grep -v "^ggml\|^llama\|^load" | tail -6
      echo "== llama-batched-bench (prompt 512, 128 decoded per sequence)"
      timeout 150 "$b/llama-batched-bench" -m "$u/moe.gguf" -c 16384 -b 2048 -ub 512 -npp 512 -ntg 128 -npl 1,4,16 \
        -ngl 99 -fa on 2>&1 | grep "^|" | tail -6
    } 2>&1 | tee "$OUT/gpu-moe-llama.txt"
  fi
  if has batching; then
    CUDA_LIBS=$libs timeout 330 bash scripts/bench-h200.sh "$u/bin" "$u/models" "$u/llama-build/bin" "$u/out-kernels" 2>&1 | tail -25
    cp "$u/out-kernels/summary.txt" "$OUT/summary-kernels.txt" 2>/dev/null
  fi
  if has prefix; then
    PHASES=prefix CUDA_LIBS=$libs timeout 200 bash scripts/bench-h200.sh "$u/bin" "$u/models" "$u/llama-build/bin" "$u/out-prefix" 2>&1 | tail -25
    cp "$u/out-prefix/summary.txt" "$OUT/summary-prefix.txt" 2>/dev/null
  fi
  if has portable; then
    ULT_ATTENTION=portable SKIP_LLAMA=1 PHASES=concurrency CUDA_LIBS=$libs timeout 150 \
      bash scripts/bench-h200.sh "$u/bin" "$u/models" "$u/llama-build/bin" "$u/out-portable" 2>&1 | tail -8
    cp "$u/out-portable/summary.txt" "$OUT/summary-portable.txt" 2>/dev/null
  fi
  (cd "$u" && tar -cJf "$OUT/bench-logs.tar.xz" out-* 2>/dev/null)
  ;;
esac
