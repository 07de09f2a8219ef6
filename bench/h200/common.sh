#!/usr/bin/env bash
# What the device scripts of bench/h200 share (sourced, from the repository root on the GPU machine): the
# work folder /tmp/ult ($u), the CUDA libraries of the machine's torch environment on LD_LIBRARY_PATH, and
# start_llama_build, which unpacks llama.cpp's trimmed sources ($1: llama-src.tar.xz) and starts a CUDA
# build of the targets after it in its own process session (it outlives the call while the machine stays
# warm), writing /tmp/ult/llama-build.rc when done and /tmp/ult/llama-build.t0 when started.
u=/tmp/ult
mkdir -p "$u/bin"
libs=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export ULT_CACHE=$u/cache

start_llama_build() {
  local src=$1
  shift
  rm -rf "$u/src" && mkdir -p "$u/src" && tar -xJf "$src" -C "$u/src"
  cat >"$u/build-llama.sh" <<SH
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S /tmp/ult/src/llama.cpp -B /tmp/ult/llama-build "\${gen[@]}" -DCMAKE_BUILD_TYPE=Release \\
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \\
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \\
  -DBUILD_SHARED_LIBS=OFF && cmake --build /tmp/ult/llama-build --config Release -j 14 --target $*
echo \$? >/tmp/ult/llama-build.rc
SH
  rm -f "$u/llama-build.rc"
  date +%s >"$u/llama-build.t0"
  setsid nohup bash "$u/build-llama.sh" >"$u/llama-build.log" 2>&1 </dev/null &
}
