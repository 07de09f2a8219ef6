#!/usr/bin/env bash
# Benchmarks ult behind Ray Serve: the skewed workload with ult's residency-aware routing and with Ray's
# default routing, in one run on three local ult nodes; prints loads and time to first token p50/p99.
# Creates the pinned virtual environment if needed. Arguments go to bench.py (--help lists them).
# Environment: ULTD (the ultd binary; default ~/.cache/ult/target/debug/ultd), ULT_CACHE.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${ULT_CACHE:-$HOME/.cache/ult}
venv=${ULT_RAY_VENV:-$cache/ray-venv}
export ULTD=${ULTD:-$cache/target/debug/ultd}
[ -x "$ULTD" ] || { echo "bench.sh: no ultd binary at $ULTD (build it: cargo build -p ultd, or set ULTD)" >&2; exit 2; }

want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [ ! -f "$venv/.ready" ] || [ "$(cat "$venv/.ready")" != "$want" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  echo "$want" >"$venv/.ready"
fi

export RAY_TMPDIR=$(mktemp -d /tmp/ultray.XXXXXX)
export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH}
export RAY_USAGE_STATS_ENABLED=0
pid=
cleanup() {
  if [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null; then
    for _ in $(seq 1 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -rf "$RAY_TMPDIR"
}
trap cleanup EXIT INT TERM

echo "machine: $(nproc) CPU cores, $(free -g | awk '/^Mem:/ {print $2}') GiB memory, no GPU; ultd: $ULTD"
# Ray's and Serve's own log lines go to stderr, which is kept out of the report.
setsid "$venv/bin/python" "$here/bench.py" "$@" 2>"$RAY_TMPDIR/bench.stderr" &
pid=$!
rc=0
wait "$pid" || rc=$?
[ "$rc" = 0 ] || { echo "bench.sh: bench.py exited with $rc; its stderr:" >&2; tail -40 "$RAY_TMPDIR/bench.stderr" >&2; }
exit "$rc"
