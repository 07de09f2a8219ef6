#!/usr/bin/env bash
# Builds ultd (and ultctl) with `--features cuda` on a machine without a GPU, for sm_90 (H100/H200), and
# prints the path of a stripped, xz-compressed bundle to carry to a GPU machine.
#
# The CUDA toolkit comes from NVIDIA's PyPI wheels in a private virtual environment; their nvidia/cu13
# folder serves as CUDA_HOME. cudarc links the CUDA libraries dynamically, so the link step needs them:
# cuBLAS, cuRAND and NVRTC come from their wheels, and the driver library (libcuda.so.1, which only a GPU
# machine has) is replaced at link time by a stub that defines the same symbols. At run time the real
# libraries are found through LD_LIBRARY_PATH on the GPU machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache=${ULT_CACHE:-$HOME/.cache/ult}
venv=$cache/cuda-venv
wheels="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88"
if [ ! -f "$venv/.ready" ] || [ "$(cat "$venv/.ready")" != "$wheels" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --no-deps $wheels
  echo "$wheels" >"$venv/.ready"
fi
cu=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cu/bin/nvcc" ] || { echo "nvcc missing from $cu" >&2; exit 1; }

# Unversioned names for the linker, and the driver stub.
links=$cache/cuda-link
rm -rf "$links" && mkdir -p "$links"
for lib in cublas cublasLt curand nvrtc cudart; do
  real=$(ls "$cu"/lib/lib$lib.so.* 2>/dev/null | head -1)
  [ -n "$real" ] || { echo "lib$lib missing from $cu/lib" >&2; exit 1; }
  ln -s "$real" "$links/lib$lib.so"
done
# `|| true`: under `set -euo pipefail` a failing `ls` (a fresh registry) would end the script silently
# before the fetch below could run.
find_cudarc() { ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.* 2>/dev/null | head -1 || true; }
cudarc=$(find_cudarc)
if [ -z "$cudarc" ]; then
  cargo fetch --locked >/dev/null
  cudarc=$(find_cudarc)
fi
[ -n "$cudarc" ] || { echo "cudarc 0.19 sources not found in the cargo registry after cargo fetch" >&2; exit 1; }
grep -rhoE "fn cu[A-Za-z0-9_]+" "$cudarc/src/driver/sys/" | sort -u | sed 's/^fn \(.*\)/void \1(void) {}/' >"$links/cuda_stub.c"
gcc -shared -fPIC -o "$links/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$links/cuda_stub.c"
ln -s libcuda.so.1 "$links/libcuda.so"

export CUDA_HOME=$cu CUDA_ROOT=$cu CUDA_PATH=$cu PATH=$cu/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
export NVCC_APPEND_FLAGS="--compress-mode=size ${NVCC_APPEND_FLAGS:-}"
export LIBRARY_PATH=$links:$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -C target-cpu=x86-64-v3 -L native=$links"
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$cache/target-cuda}

cargo build --release --locked --features cuda -p ultd --bin ultd --example bench --example compare
cargo build --release --locked -p ult-client --bin ultctl --example bench_grpc
# The engine's tests that need the GPU (the kernels against the portable ops; batched = alone with
# ULT_TEST_DEVICE=cuda), built but not run: this machine has no GPU. ULT_CUDA_TESTS=0 skips them.
tests=()
if [ "${ULT_CUDA_TESTS:-1}" != 0 ]; then
  while IFS=' ' read -r name exe; do
    cp "$exe" "$CARGO_TARGET_DIR/release/$name"
    tests+=("$CARGO_TARGET_DIR/release/$name")
  done < <(cargo test --release --locked --features cuda -p ult-engine --lib --test batching --no-run \
    --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("ult_engine", "batching"):
        print(("engine-" + ("lib" if m["target"]["name"] == "ult_engine" else "batching") + "-tests"), m["executable"])
')
  [ ${#tests[@]} = 2 ] || { echo "build-cuda: the engine test binaries were not built" >&2; exit 1; }
fi

out=$cache/cuda-bundle
rm -rf "$out" && mkdir -p "$out"
cp "$CARGO_TARGET_DIR/release/ultd" "$CARGO_TARGET_DIR/release/ultctl" "$CARGO_TARGET_DIR/release/examples/bench" \
  "$CARGO_TARGET_DIR/release/examples/bench_grpc" "$CARGO_TARGET_DIR/release/examples/compare" ${tests[@]+"${tests[@]}"} "$out/"
strip "$out"/*
# A 64 MiB window: the three CUDA binaries share their kernels, so xz stores those once.
tar -C "$out" -cf - . | xz -9 -T1 >"$cache/ult-cuda-sm${CUDA_COMPUTE_CAP}.tar.xz"
ls -l "$cache/ult-cuda-sm${CUDA_COMPUTE_CAP}.tar.xz" >&2
echo "$cache/ult-cuda-sm${CUDA_COMPUTE_CAP}.tar.xz"
