#!/usr/bin/env bash
# Device call 1 of 2 (run from the repository root on the GPU machine): keeps the first part of the model
# under /tmp/ult, unpacks the trimmed llama.cpp sources (vendor/llama.cpp of the llama-cpp-python 0.3.36
# sdist, less models/docs/media/benches/gguf-py/tests) and starts a CUDA build of llama-server in its own
# process session (it outlives this call while the machine stays warm). Writes /tmp/ult/llama-build.rc.
set -u
mkdir -p /tmp/ult/models/smollm2 /tmp/ult/out
cp bench/h200/parts/model.part1 /tmp/ult/model.part1
rm -rf /tmp/ult/src && mkdir -p /tmp/ult/src && tar -xJf bench/h200/parts/llama-src.tar.xz -C /tmp/ult/src
cat >/tmp/ult/build-llama.sh <<'SH'
set -x
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S /tmp/ult/src/llama.cpp -B /tmp/ult/llama-build "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DBUILD_SHARED_LIBS=OFF && cmake --build /tmp/ult/llama-build --config Release -j "$(nproc)" --target llama-server
echo $? >/tmp/ult/llama-build.rc
SH
t0=$(date +%s); echo "$t0" >/tmp/ult/llama-build.t0
setsid nohup bash /tmp/ult/build-llama.sh >/tmp/ult/llama-build.log 2>&1 </dev/null &
sleep 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
nvcc --version | tail -2; cmake --version | head -1; gcc --version | head -1; nproc
ls -la /tmp/ult
