"""Benchmark: the skewed workload over three ult nodes behind Ray Serve, with ult's residency-aware routing
and with Ray's default power-of-two-choices routing, in one run on the same nodes, each from a cold start.
Prints, per router, model loads (from every ultd's Status) and time to first token p50/p99. Run by
bench.sh, which sets up the environment; the arguments are described by --help."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MODELS, Stack, percentile, run_workload, skewed_requests, total_loads  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=90, help="requests per router (default 90)")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per generation (default 8)")
    p.add_argument("--seed", type=int, default=7, help="workload seed (default 7)")
    p.add_argument("--ceiling", default="700MiB", help="each ultd's memory ceiling (default 700MiB: one LLM + the embedder)")
    p.add_argument("--order", default="default,ult", help="routers in the order they run (default default,ult)")
    args = p.parse_args()

    requests = skewed_requests(args.requests, args.seed, max_tokens=args.max_tokens)
    mix = {m: sum(r["model"] == m for r in requests) for m in MODELS}
    work = Path(tempfile.mkdtemp(prefix="ult-ray-bench-"))
    stack = Stack(work, nodes=3, ceiling=args.ceiling)
    rows = []
    try:
        t0 = time.monotonic()
        stack.start()
        print(f"started 3 ult nodes (ultd ceiling {args.ceiling}) and Ray Serve in {time.monotonic() - t0:.0f}s", flush=True)
        print(f"workload: {args.requests} requests {mix}, {args.concurrency} concurrent clients, "
              f"{args.max_tokens} tokens per generation, streamed; seed {args.seed}", flush=True)
        for app in args.order.split(","):
            stack.reset()
            before = stack.loads()
            t = time.monotonic()
            outcomes = run_workload(stack.url(app), requests, args.concurrency)
            wall = time.monotonic() - t
            loads = total_loads(before, stack.loads())
            gen = [o.ttft_s for o in outcomes if o.ttft_s is not None and o.model != "minilm"]
            emb = [o.total_s for o in outcomes if o.model == "minilm" and o.ok]
            failed = [o for o in outcomes if not o.ok]
            retried = sum(o.attempts > 1 for o in outcomes)
            rows.append((app, loads, gen, emb, wall, failed, retried))
            print(f"  {app}: done in {wall:.1f}s", flush=True)
    finally:
        stack.close()
        if os.environ.get("ULT_RAY_KEEP"):
            print(f"kept the nodes' logs in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    name = {"ult": "ult-aware", "default": "Ray default (pow-2)"}
    print()
    print(f"{'routing':22} {'loads':>5}  {'smollm2/gemma3/minilm':>21}  {'TTFT p50':>8} {'TTFT p99':>8}  {'embed p50':>9}  {'wall':>6}  retried  failed")
    for app, loads, gen, emb, wall, failed, retried in rows:
        per = "/".join(str(loads[m]) for m in ("smollm2", "gemma3", "minilm"))
        print(f"{name.get(app, app):22} {sum(loads.values()):5}  {per:>21}  {percentile(gen, 50):7.2f}s {percentile(gen, 99):7.2f}s"
              f"  {percentile(emb, 50):8.2f}s  {wall:5.1f}s  {retried:7}  {len(failed)}")
    for app, *_, failed, _retried in rows:
        for o in failed[:5]:
            print(f"  {app} request {o.i} ({o.model}) failed: {o.error[:300]}")
    return 1 if any(r[5] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
