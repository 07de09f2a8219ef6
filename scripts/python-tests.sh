#!/usr/bin/env bash
# Tests ult with independent clients: the openai and ollama packages, grpcio stubs generated from proto/, the gRPC
# health and reflection clients, and prometheus_client — against two real ultd processes with the real
# models (one generous, one with a tight ceiling). Installs its own pinned virtual environment.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache=${ULT_CACHE:-$HOME/.cache/ult}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
venv=$cache/pytest-venv
requirements="openai==3.57.0 ollama==0.6.3 grpcio==1.85.3 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 prometheus_client==0.26.0 pytest==9.2.0 pytest-timeout==2.4.0 requests==2.32.5"
if [ ! -f "$venv/.ready" ] || [ "$(cat "$venv/.ready")" != "$requirements" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet $requirements
  echo "$requirements" >"$venv/.ready"
fi

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/gen"
"$venv/bin/python" -m grpc_tools.protoc -I proto --python_out="$work/gen" --grpc_python_out="$work/gen" proto/ult/v1/ult.proto

cargo build --locked -p ultd -p ult-client
ultd=$CARGO_TARGET_DIR/debug/ultd

start() { # name ceiling -> sets ${name}_grpc and ${name}_http
  local name=$1 ceiling=$2
  cat >"$work/$name.toml" <<TOML
[daemon]
listen = "127.0.0.1:0"
http = "127.0.0.1:0"
ollama = "127.0.0.1:0"
socket = "off"
state_file = "off"
memory_ceiling = "$ceiling"
headroom = "0"
load_wait = "5s"
[models.smollm2]
path = "$root/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
kind = "chat"
context = 2048
[models.gemma3]
path = "$root/models/gemma3/gemma-3-270m-q4_k_m.gguf"
kind = "completion"
context = 1024
[models.minilm]
path = "$root/models/minilm"
kind = "embedding"
context = 256
[routes.chat]
models = ["smollm2"]
TOML
  "$ultd" --config "$work/$name.toml" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
  for _ in $(seq 1 300); do grep -q listening "$work/$name.out" 2>/dev/null && break; sleep 0.1; done
  grep -q listening "$work/$name.out" || { cat "$work/$name.err" >&2; exit 1; }
  eval "${name}_grpc=$(sed -n 's/^ultd listening on \([^ ]*\) .*/\1/p' "$work/$name.out")"
  eval "${name}_http=$(sed -n 's/.*, http \([^,]*\),.*/\1/p' "$work/$name.out")"
  eval "${name}_ollama=$(sed -n 's/.*, ollama \([^,]*\),.*/\1/p' "$work/$name.out")"
}
start main 8GiB
start tight 420MiB

export ULT_GRPC=$main_grpc ULT_HTTP=$main_http ULT_OLLAMA=$main_ollama ULT_TIGHT_GRPC=$tight_grpc ULT_TIGHT_HTTP=$tight_http
export ULTCTL=$CARGO_TARGET_DIR/debug/ultctl
export PYTHONPATH=$work/gen
timeout 900 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/python
