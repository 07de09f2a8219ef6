"""(a) Residency-aware routing against Ray's default routing, side by side in one run: the same skewed
workload over the three shipped models, from a cold start each time, on the same three ult nodes (each
ultd's ceiling holds one LLM plus the embedder). Loads are counted from every ultd's Status."""

import os

from harness import MODELS, percentile, run_workload, skewed_requests, total_loads

REQUESTS = int(os.environ.get("ULT_RAY_REQUESTS", "36"))
CONCURRENCY = 3


def run_phase(stack, app, requests):
    stack.reset()
    before = stack.loads()
    outcomes = run_workload(stack.url(app), requests, CONCURRENCY)
    loads = total_loads(before, stack.loads())
    holders = {m: {u.name for u in stack.ultds if m in u.resident()} for m in MODELS}
    return outcomes, loads, holders


def test_requests_land_where_their_model_is_resident(stack):
    requests = skewed_requests(REQUESTS, seed=7)
    phases = {app: run_phase(stack, app, requests) for app in ("default", "ult")}

    for app, (outcomes, loads, _) in phases.items():
        ttft = [o.ttft_s for o in outcomes if o.ttft_s is not None and o.model != "minilm"]
        print(f"{app:8} loads {sum(loads.values()):3} {loads}  ttft p50 {percentile(ttft, 50):.2f}s p99 {percentile(ttft, 99):.2f}s")
        failed = [o for o in outcomes if not o.ok]
        assert not failed, f"{app}: {len(failed)} requests failed: {failed[:3]}"

    outcomes, loads, holders = phases["ult"]
    # Each model was loaded once, on one node, and every request for it was served where it was resident:
    # the first request of a model finds it nowhere and loads it; every later one finds it there.
    assert loads == {m: 1 for m in MODELS}, f"ult-aware routing loaded {loads}"
    for o in outcomes:
        assert o.node in holders[o.model], f"request {o.i} for {o.model} went to {o.node}; {o.model} is resident on {holders[o.model]}"
    assert len({next(iter(h)) for h in holders.values()}) == 3, f"the three models should spread over the three nodes: {holders}"

    default_loads = sum(phases["default"][1].values())
    assert sum(loads.values()) < default_loads, f"ult-aware routing made {sum(loads.values())} loads, Ray's default {default_loads}"
