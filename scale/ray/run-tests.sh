#!/usr/bin/env bash
# Runs the Ray Serve tests of ult (scale/ray/tests): creates the pinned virtual environment if needed, and
# the tests start everything themselves (three real ultd processes, a local three-node Ray cluster, Ray
# Serve) and stop it at the end. Exits non-zero on failure. Extra arguments go to pytest.
# Environment: ULTD (the ultd binary; default ~/.cache/ult/target/debug/ultd), ULT_CACHE, ULT_RAY_KEEP=1
# (keep the nodes' logs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${ULT_CACHE:-$HOME/.cache/ult}
venv=${ULT_RAY_VENV:-$cache/ray-venv}
export ULTD=${ULTD:-$cache/target/debug/ultd}

[ -x "$ULTD" ] || { echo "run-tests.sh: no ultd binary at $ULTD (build it: cargo build -p ultd, or set ULTD)" >&2; exit 2; }
for m in smollm2/SmolLM2-135M-Instruct.Q4_1.gguf gemma3/gemma-3-270m-q4_k_m.gguf minilm; do
  [ -e "$here/../../models/$m" ] || { echo "run-tests.sh: models/$m is missing (scripts/fetch-models.sh fetches it)" >&2; exit 2; }
done

want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [ ! -f "$venv/.ready" ] || [ "$(cat "$venv/.ready")" != "$want" ]; then
  echo "run-tests.sh: creating $venv from requirements.txt" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  echo "$want" >"$venv/.ready"
fi

# Ray's session files go to a folder of this run (Unix socket paths must stay short), removed at the end.
export RAY_TMPDIR=$(mktemp -d /tmp/ultray.XXXXXX)
export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH}
export RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0
pid=
cleanup() {
  # pytest runs in its own process group, with every ultd and Ray process it started: end that group.
  # Normally it is empty by now (the tests stop what they start); this catches an interrupted run.
  if [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null; then
    for _ in $(seq 1 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  if [ -n "${ULT_RAY_KEEP:-}" ]; then echo "run-tests.sh: kept Ray's logs in $RAY_TMPDIR" >&2; else rm -rf "$RAY_TMPDIR"; fi
}
trap cleanup EXIT INT TERM

cd "$here"
start=$(date +%s)
setsid "$venv/bin/python" -m pytest -p no:cacheprovider -p no:warnings -q -s --timeout 420 tests "$@" &
pid=$!
rc=0
wait "$pid" || rc=$?
echo "run-tests.sh: pytest exited with $rc after $(( $(date +%s) - start ))s" >&2
exit "$rc"
