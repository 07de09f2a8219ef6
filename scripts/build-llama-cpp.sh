#!/usr/bin/env bash
# Builds llama.cpp's llama-server, llama-bench and llama-batched-bench for this machine's CPU, from the
# llama.cpp sources vendored in the llama-cpp-python 0.3.36 sdist (a pinned, pip-fetchable llama.cpp), as
# the peer that scripts/bench-concurrency.sh measures ult against. cmake comes from pip into a private venv
# when the system has none. Everything is cached under ${ULT_CACHE:-~/.cache/ult}/llama.cpp-0.3.36/; a second
# run builds nothing. The last line of stdout is the directory holding the binaries.
#   scripts/build-llama-cpp.sh            (set ULT_LLAMA_JOBS to change the -j2 default)
set -euo pipefail

version=0.3.36
base=${ULT_CACHE:-$HOME/.cache/ult}/llama.cpp-$version
bin=$base/build/bin
targets=(llama-server llama-bench llama-batched-bench)
jobs=${ULT_LLAMA_JOBS:-2}

# AMX stays off: on this workplace's Sapphire Rapids VMs the CPU advertises AMX tiles, so -march=native
# builds ggml's AMX kernels, and their first matmul dies with a general-protection fault (the VM does not
# grant the tile state). An explicit -mno-amx-* wins over -march=native in GCC whatever their order; the
# rest of the native ISA (AVX-512, VNNI, ggml's repacked kernels) is kept. The stamp rebuilds an older
# AMX build once.
flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
stamp=$base/build/ult-flags
built() {
  local t
  [ "$(cat "$stamp" 2>/dev/null)" = "$flags" ] || return 1
  for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done
}
if built; then
  echo "$bin"
  exit 0
fi
mkdir -p "$base"

# 1. Sources: the sdist, unpacked once.
src=$base/src
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  mkdir -p "$base/sdist"
  sdist=$(ls "$base"/sdist/llama_cpp_python-$version.tar.gz "$base"/sdist/llama-cpp-python-$version.tar.gz 2>/dev/null | head -1 || true)
  if [ -z "$sdist" ]; then
    echo "llama.cpp: downloading the llama-cpp-python $version sdist" >&2
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$version" -d "$base/sdist" >&2 ||
      python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$base/sdist" >&2
    sdist=$(ls "$base"/sdist/*.tar.gz | head -1)
  fi
  rm -rf "$src.tmp"
  mkdir -p "$src.tmp"
  tar -xzf "$sdist" -C "$src.tmp" --strip-components=1
  [ -f "$src.tmp/vendor/llama.cpp/CMakeLists.txt" ] || { echo "llama.cpp: no vendor/llama.cpp in $sdist" >&2; exit 1; }
  rm -rf "$src"
  mv "$src.tmp" "$src"
fi
llama=$src/vendor/llama.cpp

# 2. cmake: the system's, or one pip-installed into a private venv.
if command -v cmake >/dev/null 2>&1; then
  cmake=$(command -v cmake)
else
  cmake=$base/venv/bin/cmake
  if [ ! -x "$cmake" ]; then
    echo "llama.cpp: installing cmake into $base/venv" >&2
    python3 -m venv "$base/venv"
    "$base/venv/bin/python" -m pip install --quiet cmake >&2
  fi
fi
# ninja is optional; make is the fallback generator.
gen=()
if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi

# 3. Configure and build only the needed targets.
if [ "$(cat "$stamp" 2>/dev/null)" != "$flags" ]; then rm -rf "$base/build"; fi
if [ ! -f "$base/build/CMakeCache.txt" ]; then
  "$cmake" -S "$llama" -B "$base/build" "${gen[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF >&2
fi
"$cmake" --build "$base/build" --config Release -j "$jobs" --target "${targets[@]}" >&2
echo "$flags" > "$stamp"
built || { echo "llama.cpp: build finished but ${targets[*]} are not all in $bin" >&2; exit 1; }
echo "$bin"
