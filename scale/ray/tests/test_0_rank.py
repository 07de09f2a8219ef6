"""The routing policy itself (ult_serve.router.rank) on views shaped as the replicas report them: resident
first, then the cheapest load, down and excluded nodes last. Pure data in, ranking out; no cluster."""

from ult_serve.router import Candidate, rank

MiB = 1 << 20


def view(node, resident=(), free=700 * MiB, plans=None, up=True, queues=None, at=0.0):
    models = {m: {"state": "resident", "queue": (queues or {}).get(m, 0)} for m in resident}
    return {
        "v": 1, "node": node, "up": up, "at": at, "free_bytes": free, "resident": list(resident),
        "queue": sum((queues or {}).values()), "models": models,
        "names": {"chat": ["smollm2"], "smollm2": ["smollm2"], "gemma3": ["gemma3"], "minilm": ["minilm"]},
        "plans": plans or {},
    }


def plan(need, free, evictions=(), refusal=""):
    return {"fits": not refusal, "need_bytes": need, "free_bytes": free, "refusal": refusal, "evictions": list(evictions)}


def test_resident_node_comes_first_and_routes_resolve_aliases():
    a = Candidate("a", view("n0", resident=["smollm2"]))
    b = Candidate("b", view("n1", plans={"smollm2": plan(543 * MiB, 700 * MiB), "gemma3": plan(396 * MiB, 700 * MiB)}))
    assert rank("smollm2", [b, a]) == [["a"], ["b"]]
    assert rank("chat", [b, a]) == [["a"], ["b"]]
    assert rank("gemma3", [b, a]) == [["b"], ["a"]]


def test_cold_model_goes_where_eviction_costs_least_then_most_room():
    # n0 would evict a valuable model, n1 a cheap one, n2 nothing but has less room left than n3.
    n0 = Candidate("n0", view("n0", ["smollm2"], plans={"gemma3": plan(396 * MiB, 157 * MiB, [["smollm2", 543 * MiB, 5000.0]])}))
    n1 = Candidate("n1", view("n1", ["minilm"], plans={"gemma3": plan(396 * MiB, 100 * MiB, [["minilm", 97 * MiB, 10.0]])}))
    n2 = Candidate("n2", view("n2", plans={"gemma3": plan(396 * MiB, 450 * MiB)}))
    n3 = Candidate("n3", view("n3", plans={"gemma3": plan(396 * MiB, 700 * MiB)}))
    assert rank("gemma3", [n0, n1, n2, n3]) == [["n3"], ["n2"], ["n1"], ["n0"]]


def test_evicting_a_model_held_elsewhere_costs_less():
    evict_smol = plan(396 * MiB, 157 * MiB, [["smollm2", 543 * MiB, 100.0]])
    evict_mini = plan(396 * MiB, 157 * MiB, [["minilm", 97 * MiB, 100.0 * 543 / 97 * 2]])
    n0 = Candidate("n0", view("n0", ["smollm2"], plans={"gemma3": evict_smol}))
    n1 = Candidate("n1", view("n1", ["minilm"], plans={"gemma3": evict_mini}))
    n2 = Candidate("n2", view("n2", ["smollm2"], free=0, plans={}))
    # minilm's copy is the only one; smollm2 also lives on n2, so evicting it from n0 is the cheaper loss.
    assert rank("gemma3", [n0, n1, n2])[0] == ["n0"]


def test_down_excluded_and_refusing_nodes_come_last():
    up = Candidate("a", view("n0", plans={"gemma3": plan(1, 700 * MiB)}))
    refuses = Candidate("b", view("n1", plans={"gemma3": plan(1, 0, refusal="pinned models leave no room")}))
    down = Candidate("c", {"v": 1, "node": "n2", "up": False, "error": "UNAVAILABLE"})
    failed_before = Candidate("d", view("n3", ["gemma3"]))
    # n3 holds gemma3 but the request already failed there; n2 is down.
    assert rank("gemma3", [down, refuses, failed_before, up], exclude_nodes=["n3"]) == [["a"], ["b"], ["c", "d"]]


def test_overlay_of_a_load_in_flight_counts_as_resident_and_takes_its_room():
    # This router just sent smollm2 to n0 (not yet in n0's report): the next smollm2 request follows it,
    # and a gemma3 request does not pile onto n0 as if its memory were still free.
    n0 = Candidate("n0", view("n0", plans={"smollm2": plan(543 * MiB, 700 * MiB), "gemma3": plan(396 * MiB, 700 * MiB)}),
                   also_held={"smollm2"}, pending_bytes=543 * MiB)
    n1 = Candidate("n1", view("n1", plans={"smollm2": plan(543 * MiB, 700 * MiB), "gemma3": plan(396 * MiB, 700 * MiB)}))
    assert rank("smollm2", [n1, n0])[0] == ["n0"]
    assert rank("gemma3", [n0, n1])[0] == ["n1"]


def test_hot_model_spills_only_to_a_node_with_free_room():
    hot = Candidate("a", view("n0", ["smollm2"], queues={"smollm2": 9}))
    roomy = Candidate("b", view("n1", plans={"smollm2": plan(543 * MiB, 700 * MiB)}))
    full = Candidate("c", view("n2", ["gemma3"], plans={"smollm2": plan(543 * MiB, 304 * MiB, [["gemma3", 396 * MiB, 1.0]])}))
    assert rank("smollm2", [hot, roomy, full], spill_queue_depth=8) == [["a", "b"], ["c"]]
    assert rank("smollm2", [hot, full], spill_queue_depth=8) == [["a"], ["c"]]
    assert rank("smollm2", [hot, roomy, full], spill_queue_depth=0) == [["a"], ["b"], ["c"]]


def test_request_without_a_model_may_go_to_any_up_node():
    a = Candidate("a", view("n0"))
    b = Candidate("b", {"v": 1, "node": "n1", "up": False})
    assert rank("", [a, b]) == [["a"], ["b"]]
