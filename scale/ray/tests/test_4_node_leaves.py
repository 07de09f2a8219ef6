"""A Ray node leaves mid-run (its raylet and workers killed, as a crashed machine's would be; its ultd
keeps running): requests on it fail clearly or are retried elsewhere, the rest keep serving, requests
sent after Ray noticed go elsewhere, and when a Ray node with the same custom resources joins again the
replica comes back and serves."""

import threading
import time

from harness import run_workload, skewed_requests, wait_for


def test_ray_node_leaves_then_joins_again(stack):
    # Spread the models (cold start: one per node), then pick a worker node holding an LLM.
    stack.reset()
    warm = [r for r in skewed_requests(12, seed=5) if r["model"] != "minilm"][:4]
    assert all(o.ok for o in run_workload(stack.url("ult"), warm, concurrency=1))
    index = next(i for i in range(1, len(stack.ultds)) if {"smollm2", "gemma3"} & set(stack.ultds[i].resident()))
    name = stack.ultds[index].name
    model = next(m for m in ("smollm2", "gemma3") if m in stack.ultds[index].resident())

    requests = [r for r in skewed_requests(60, seed=13, max_tokens=24) if r["model"] == model][:12]
    done, gone = [], {}
    lock = threading.Lock()

    def on_done(o):
        with lock:
            done.append(o)
            if len(done) == 3 and not gone:
                gone["at"] = time.monotonic()
                stack.cluster.remove_node(stack.ray_nodes[index], allow_graceful=False)

    outcomes = run_workload(stack.url("ult"), requests, concurrency=3, on_done=on_done)
    silent = [o for o in outcomes if not o.ok and (not o.error or o.error.startswith("SILENT"))]
    assert not silent, f"requests lost silently: {silent}"
    for o in outcomes:
        if not o.ok:
            assert name in o.error or "replica died" in o.error, o.error
    # Nothing routed to the nodes that stayed is lost. A request routed to the leaving node before Ray
    # noticed it was gone may fail (named above); the router cannot know sooner than Ray does.
    assert all(o.ok for o in outcomes if o.node and o.node != name), [o for o in outcomes if not o.ok]
    print(f"{name} left: {sum(not o.ok for o in outcomes)} errors, {sum(o.ok and o.attempts > 1 for o in outcomes)} retried")
    for o in outcomes:
        if not o.ok:
            print(f"  request {o.i} ({o.model}): {o.error}")

    # Once Serve and the router know the node is gone, requests for its model go elsewhere and succeed.
    wait_for(f"{name}'s replicas to leave Serve", lambda: stack.running_replicas() == {"ult": 2, "default": 2}, 60)
    wait_for(f"the router to drop {name}", lambda: name not in {r["node"] for r in stack.routing_view("ult")}, 60)
    after = run_workload(stack.url("ult"), requests[:3], concurrency=3)
    assert all(o.ok and o.node != name for o in after), [(o.node, o.error) for o in after]

    stack.ray_nodes[index] = stack.cluster.add_node(**stack.node_args(index))
    stack.wait_running(3, timeout_s=120)

    # Its ultd still holds the model; once no other node does, requests for it must go there.
    for i, u in enumerate(stack.ultds):
        if i != index:
            u.unload(model)
    stack.wait_view_fresh(time.time())
    again = run_workload(stack.url("ult"), requests[:2], concurrency=1)
    assert all(o.ok and o.node == name for o in again), [(o.node, o.error) for o in again]
