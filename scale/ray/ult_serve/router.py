"""Residency-aware request routing for ult nodes behind Ray Serve: a custom `RequestRouter`.

A request for model X (Ray's multiplexed model id, set by the ingress from the request's "model") goes to a
replica whose ultd holds X (resident or loading); among several, Ray's own queue-length check picks the
least busy. When no node holds X, it goes to the replica where loading X costs least, from each ultd's
PlanLoad: first the least eviction cost (the sum of score × bytes of the models ult would evict, the same
quantity ult's own policy minimises; a model that another node also holds counts only `duplicate_discount`
of it, since evicting a copy loses less), then the most memory left free after the load (which spreads
models across nodes), then ult's queue depth. A hot model whose every copy has at least
`spill_queue_depth` requests in flight or queued in ult also gets the best node that can load it without
evicting anything, beside its copies (0 turns that off). Nodes whose ultd is down, and nodes the request
already failed on (the ingress passes them as the call's `exclude_nodes`), are used only when no other
node is left, so a request is never stuck while any replica exists.

The choice is strict: the request waits for the chosen node(s) instead of falling back to the next best
when Ray's queue-length probe of them is late or they are at max_ongoing_requests, since falling back
would load the model on a second node.

The replicas' views arrive through Ray Serve's routing stats (`record_routing_stats`, every
`request_routing_stats_period_s`). Between two reports this router also remembers its own recent
decisions: a request it sent to a node that did not hold X makes that node count as holding X (and as no
longer holding what PlanLoad said it would evict) until a report newer than the decision arrives, so a
burst of requests for a cold model loads it once instead of on every node.

`rank` is the policy as a pure function over the views; `UltResidencyRouter` adapts it to Ray Serve.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, Iterable, List, Optional, Sequence, Set, Tuple

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ult_serve import registry

logger = logging.getLogger("ray.serve")


@dataclass
class Candidate:
    """One replica as the policy sees it: its reported view and this router's overlay on it."""

    key: Hashable
    view: Dict[str, Any]
    also_held: Set[str] = field(default_factory=set)
    gone: Set[str] = field(default_factory=set)
    # Bytes of the loads in also_held, which the reported free_bytes does not show yet.
    pending_bytes: int = 0

    @property
    def node(self) -> str:
        return str(self.view.get("node", ""))

    @property
    def up(self) -> bool:
        # A replica that has not reported yet ({}) is assumed up: its health check vouches for it.
        return bool(self.view.get("up", True))

    def held(self) -> Set[str]:
        return (set(self.view.get("resident", ())) | self.also_held) - self.gone

    def canonical(self, model: str) -> List[str]:
        return list(self.view.get("names", {}).get(model, [model]))

    def model_queue(self, model: str) -> int:
        """Requests in flight or queued in ult for the model here (0 when not reported)."""
        models = self.view.get("models", {})
        return sum(int(models.get(name, {}).get("queue", 0)) for name in self.canonical(model))


# Cost tiers for a node that does not hold the model.
TIER_PLANNED = 0  # PlanLoad says it can be loaded
TIER_UNKNOWN = 1  # no plan reported (a new replica, or a model name ultd does not know)
TIER_REFUSED = 2  # PlanLoad says ultd would refuse the load


def load_cost(c: Candidate, model: str, holders: Dict[str, Set[Hashable]], duplicate_discount: float) -> Tuple:
    """The sort key of loading `model` on candidate `c` (smaller is better)."""
    best: Tuple = (TIER_UNKNOWN, math.inf, 0.0, int(c.view.get("queue", 0)))
    plans = c.view.get("plans", {})
    for name in c.canonical(model):
        plan = plans.get(name)
        if plan is None:
            continue
        if plan.get("refusal"):
            key = (TIER_REFUSED, math.inf, 0.0, int(c.view.get("queue", 0)))
        else:
            cost = 0.0
            freed = 0
            for evicted, nbytes, score in plan.get("evictions", ()):
                elsewhere = bool(holders.get(evicted, set()) - {c.key})
                cost += float(score) * float(nbytes) * (duplicate_discount if elsewhere else 1.0)
                freed += int(nbytes)
            free_after = int(plan.get("free_bytes", 0)) - c.pending_bytes + freed - int(plan.get("need_bytes", 0))
            if free_after < 0 and c.pending_bytes:
                # Loads this router sent there since the report leave no room: the plan is out of date and
                # the load would evict something it does not name.
                cost = math.inf
            key = (TIER_PLANNED, cost, -float(free_after), int(c.view.get("queue", 0)))
        best = min(best, key)
    return best


def rank(
    model: str,
    candidates: Sequence[Candidate],
    exclude_nodes: Iterable[str] = (),
    duplicate_discount: float = 0.25,
    spill_queue_depth: int = 8,
) -> List[List[Hashable]]:
    """Ranks replicas for a request for `model` ("" for a request that names none): a list of ranks, most
    preferred first, each a list of replica keys among which Ray picks the shortest queue. The router sends
    a request to the first rank only (see UltResidencyRouter.choose_replicas); the rest is the order of
    preference behind it."""
    excluded = set(exclude_nodes)
    usable = [c for c in candidates if c.up and c.node not in excluded]
    last = [c.key for c in candidates if not (c.up and c.node not in excluded)]
    ranks: List[List[Hashable]] = []
    if not model:
        ranks.append([c.key for c in usable])
    else:
        holders: Dict[str, Set[Hashable]] = defaultdict(set)
        for c in usable:
            for name in c.held():
                holders[name].add(c.key)
        resident = [c for c in usable if set(c.canonical(model)) & c.held()]
        others = [c for c in usable if c not in resident]
        costs = {c.key: load_cost(c, model, holders, duplicate_discount) for c in others}
        others.sort(key=lambda c: (costs[c.key], str(c.key)))
        first = [c.key for c in resident]
        if resident and spill_queue_depth > 0 and others:
            # A hot model whose every copy has a deep queue in ult gets one more copy, but only on a node
            # that can load it without evicting anything.
            best = others[0]
            tier, cost, neg_free_after, _ = costs[best.key]
            if min(c.model_queue(model) for c in resident) >= spill_queue_depth and tier == TIER_PLANNED and cost == 0 and neg_free_after <= 0:
                first.append(best.key)
                others = others[1:]
        ranks.append(first)
        ranks.extend([c.key] for c in others)
    ranks.append(last)
    return [r for r in ranks if r]


class UltResidencyRouter(RequestRouter):
    """Ray Serve request router that sends each request where its model is resident, else where loading it
    costs least (see the module docstring). Configure it on the UltNode deployment with
    `RequestRouterConfig(request_router_class=UltResidencyRouter, request_router_kwargs={...})`."""

    # Ray's defaults (0.1 s, growing to 1 s) are short for replicas whose node is busy loading or decoding
    # on the CPU; a probe that misses its deadline only delays the request, it no longer sends it elsewhere.
    queue_len_response_deadline_s = 0.5
    max_queue_len_response_deadline_s = 2.0

    def initialize_state(
        self,
        duplicate_discount: float = 0.25,
        spill_queue_depth: int = 8,
        decision_ttl_s: float = 30.0,
        report_grace_s: float = 1.0,
        log_decisions: bool = False,
        **kwargs: Any,
    ) -> None:
        self._duplicate_discount = float(duplicate_discount)
        self._spill_queue_depth = int(spill_queue_depth)
        self._decision_ttl_s = float(decision_ttl_s)
        self._report_grace_s = float(report_grace_s)
        self._log_decisions = bool(log_decisions)
        registry.ROUTERS.add(self)
        # This router's own recent decisions, per replica: model -> (when it was routed there, bytes the
        # load needs) for a load it caused, and model -> (when, 0) for what such a load was planned to evict.
        self._loaded_by_us: Dict[ReplicaID, Dict[str, Tuple[float, int]]] = defaultdict(dict)
        self._evicted_by_us: Dict[ReplicaID, Dict[str, Tuple[float, int]]] = defaultdict(dict)

    def _live(self, marks: Dict[str, Tuple[float, int]], view: Dict[str, Any], now: float) -> Dict[str, int]:
        """Marks not yet superseded by a report taken after them (plus a grace), nor expired."""
        reported_at = float(view.get("at", 0.0))
        return {
            m: nbytes
            for m, (t, nbytes) in marks.items()
            if now - t < self._decision_ttl_s and reported_at < t + self._report_grace_s
        }

    def _candidate(self, r: RunningReplica, now: float) -> Candidate:
        view = r.routing_stats or {}
        rid = r.replica_id
        loading = self._live(self._loaded_by_us.get(rid, {}), view, now)
        return Candidate(
            key=rid,
            view=view,
            also_held=set(loading),
            gone=set(self._live(self._evicted_by_us.get(rid, {}), view, now)),
            pending_bytes=sum(loading.values()),
        )

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        now = time.time()
        by_id = {r.replica_id: r for r in candidate_replicas}
        model = ""
        exclude: Iterable[str] = ()
        if pending_request is not None:
            model = pending_request.metadata.multiplexed_model_id or ""
            exclude = pending_request.kwargs.get("exclude_nodes") or ()
        candidates = {r.replica_id: self._candidate(r, now) for r in candidate_replicas}
        ranks = rank(
            model,
            list(candidates.values()),
            exclude_nodes=exclude,
            duplicate_discount=self._duplicate_discount,
            spill_queue_depth=self._spill_queue_depth,
        )
        # Strict: only the first rank. Ray would otherwise try the next rank whenever the first one's
        # queue-length probe is late (common on a CPU busy loading and decoding) or its replica is at
        # max_ongoing_requests, loading the model on a second node. The request waits for its node instead;
        # more copies of a model come only from the spill rule.
        ranks = ranks[:1]
        if self._log_decisions:
            logger.info(
                "ult routing %r exclude=%s: %s -> %s",
                model,
                list(exclude),
                "; ".join(
                    f"{c.node or c.key}: up={c.up} age={now - float(c.view.get('at', 0)):.1f}s held={sorted(c.held())}"
                    for c in candidates.values()
                ),
                [[candidates[k].node for k in group] for group in ranks],
            )
        if model and ranks and len(ranks[0]) == 1:
            # The request will most likely go there: if that means a load, count it now, so that the other
            # requests of a burst routed before this one is accepted see it (on_request_routed confirms).
            c = candidates[ranks[0][0]]
            if c.up and c.node not in set(exclude):
                self._mark_load(c, model, now)
        return [[by_id[k] for k in group] for group in ranks]

    def _mark_load(self, c: Candidate, model: str, now: float) -> None:
        """Remembers that a request for `model` went to candidate `c`: when `c` did not hold it, `c` now
        loads it, and stops holding what PlanLoad said the load would evict."""
        names = c.canonical(model)
        if set(names) & c.held():
            return
        target = names[0]
        plan = c.view.get("plans", {}).get(target) or {}
        self._loaded_by_us[c.key][target] = (now, int(plan.get("need_bytes", 0)))
        self._evicted_by_us[c.key].pop(target, None)
        for evicted, _nbytes, _score in plan.get("evictions", ()):
            self._evicted_by_us[c.key][evicted] = (now, 0)
            self._loaded_by_us[c.key].pop(evicted, None)
        logger.debug("ult routing: %s goes to %s, which will load it", model, c.node or c.key)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        model = pending_request.metadata.multiplexed_model_id
        replica = self._replicas.get(replica_id)
        if model and replica is not None:
            now = time.time()
            self._mark_load(self._candidate(replica, now), model, now)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._loaded_by_us.pop(replica_id, None)
        self._evicted_by_us.pop(replica_id, None)


def snapshot() -> List[Dict[str, Any]]:
    """What every residency router of this process believes now, per replica: its node, whether its ultd
    is up, the age of its last report, and what it holds (reports plus this router's recent decisions)."""
    now = time.time()
    out = []
    for router in list(registry.ROUTERS):
        replicas = []
        for r in list(router.curr_replicas.values()):
            c = router._candidate(r, now)
            replicas.append({
                "replica": r.replica_id.unique_id,
                "node": c.node,
                "up": c.up,
                "reported_at": float(c.view.get("at", 0.0)),
                "age_s": round(now - float(c.view.get("at", 0.0)), 3) if c.view else None,
                "resident": sorted(c.held()),
                "free_bytes": c.view.get("free_bytes"),
                "queue": c.view.get("queue"),
                "error": c.view.get("error", ""),
            })
        out.append({"deployment": str(router._deployment_id), "replicas": sorted(replicas, key=lambda x: x["node"])})
    return out
