"""(b) A node's ultd is killed (SIGKILL) mid-run: no request is lost silently — each completes (retried on
another node if nothing had reached the client) or gets a clear error naming the node — the other nodes
keep serving, the node's replica leaves Serve, and after ultd is restarted the node rejoins and serves."""

import threading
import time

from harness import run_workload, skewed_requests, wait_for


def test_ultd_killed_mid_run_then_rejoins(stack):
    # Longer answers, so that requests are streaming on the node when its ultd dies.
    requests = skewed_requests(30, seed=11, max_tokens=24)
    done = []
    kill = {}
    lock = threading.Lock()

    def on_done(o):
        with lock:
            done.append(o)
            if len(done) >= 6 and not kill:
                # Kill the node holding the hottest model at a moment its ultd reports a request in
                # flight (asked, not assumed from timing), so the fault hits a running request.
                victim = next(u for u in stack.ultds if "smollm2" in u.resident())
                if any(m.in_flight > 0 for m in victim.status().models):
                    kill["node"], kill["at"] = victim, time.monotonic()
                    victim.kill()

    outcomes = run_workload(stack.url("ult"), requests, concurrency=3, on_done=on_done)
    assert kill, "the victim never had a request in flight after the first 6 answers"
    victim = kill["node"]
    name = victim.name

    silent = [o for o in outcomes if not o.ok and (not o.error or o.error.startswith("SILENT"))]
    assert not silent, f"requests lost silently: {silent}"
    errors = [o for o in outcomes if not o.ok]
    for o in errors:
        assert name in o.error, f"request {o.i}'s error does not name the failed node {name}: {o.error}"
    retried = [o for o in outcomes if o.ok and o.attempts > 1]
    assert errors or retried, "the kill should have hit requests in flight on the node"
    print(f"killed {name}: {len(errors)} streams ended with an error naming it, {len(retried)} requests retried elsewhere")
    for o in errors:
        print(f"  request {o.i} ({o.model}): {o.error}")

    later = [o for o in outcomes if o.started > kill["at"]]
    assert later and all(o.ok and o.node != name for o in later), [o for o in later if not o.ok or o.node == name]

    # Its replica fails the health check and leaves; restarted, ultd brings it back.
    wait_for(f"{name}'s replicas to leave Serve", lambda: stack.running_replicas() == {"ult": 2, "default": 2}, 60)
    victim.start()
    stack.wait_running(3, timeout_s=90)

    # It serves again: from a cold cluster the three models go to three nodes (each to the most free memory).
    trio = [
        {"i": 0, "model": "smollm2", "path": "/v1/chat/completions",
         "body": {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}},
        {"i": 1, "model": "gemma3", "path": "/v1/completions",
         "body": {"model": "gemma3", "prompt": "Hi", "max_tokens": 2, "stream": True}},
        {"i": 2, "model": "minilm", "path": "/v1/embeddings", "body": {"model": "minilm", "input": "Hi"}},
    ]

    stack.reset()  # also waits until the router has the rejoined node's report
    after = run_workload(stack.url("ult"), trio, concurrency=1)
    assert all(o.ok for o in after), after
    assert name in {o.node for o in after}, f"{name} did not serve after rejoining: {[(o.model, o.node) for o in after]}"
    assert sum(m.requests for m in victim.status().models) >= 1
