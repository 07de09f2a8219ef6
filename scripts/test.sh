#!/usr/bin/env bash
# Runs all of ult's tests: fetches the models if missing (cached), checks formatting and lints, then runs
# every Rust test with cargo-nextest (each test in its own process), the Python client tests and the Ray
# Serve tests (three real ult nodes on a local Ray cluster).
# The target directory and the models' wheels are cached under ~/.cache/ult, outside the clone.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${ULT_CACHE:-$HOME/.cache/ult}/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

step "models"
scripts/fetch-models.sh
# The tiny random-weight GGUFs the family tests compare against llama.cpp's fixtures (regenerated, checked).
scripts/families/make-ggufs.sh
# The tiny Hugging Face and MLX model folders the engine's MLX tests compare against mlx-lm's fixtures
# (bf16 checkpoints, quantized by mlx_lm.convert itself; regenerated, checked).
scripts/mlx/make-checkpoints.sh

if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

step "format"
cargo fmt --all -- --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "rust tests"
cargo nextest run --workspace --locked --no-fail-fast

if [ -x scripts/python-tests.sh ]; then
  step "python client tests"
  scripts/python-tests.sh
fi

if [ -x scale/ray/run-tests.sh ]; then
  step "ray serve tests (3 local ult nodes)"
  scale/ray/run-tests.sh
fi

step "all tests passed"
