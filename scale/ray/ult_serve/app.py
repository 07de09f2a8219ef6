"""Builds the Ray Serve application: OpenAIIngress in front of UltNode, one UltNode replica per ult node.

    from ult_serve.app import build_app
    serve.run(build_app(), name="ult", route_prefix="/")

or from the command line, with the builder `app_builder` (arguments as key=value):

    serve run ult_serve.app:app_builder router=ult

`router="ult"` uses the residency-aware UltResidencyRouter; `router="default"` keeps Ray Serve's default
PowerOfTwoChoicesRequestRouter (the baseline the tests and the benchmark compare against). Each UltNode
replica needs a little of the custom resource `ult_node` (so it runs only on nodes that have a ultd) and
`max_replicas_per_node=1` (so there is one per node); the replica count defaults to the number of alive
nodes with that resource.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import ray
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from .ingress import OpenAIIngress
from .node import UltNode
from .router import UltResidencyRouter

ROUTERS = ("ult", "default")


def count_ult_nodes(resource: str = "ult_node") -> int:
    """Alive Ray nodes that advertise the custom resource (connecting to the cluster if needed: `serve run`
    calls the builder before it connects)."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) > 0)


def build_app(
    router: str = "ult",
    num_nodes: Optional[int] = None,
    node_resource: str = "ult_node",
    node_resource_amount: float = 0.01,
    stats_period_s: float = 0.5,
    health_check_period_s: float = 1.0,
    health_check_timeout_s: float = 5.0,
    max_ongoing_requests: int = 32,
    max_attempts: int = 3,
    route_timeout_s: float = 60.0,
    duplicate_discount: float = 0.25,
    spill_queue_depth: int = 8,
    log_decisions: bool = False,
    ingress_on_head: bool = True,
) -> Application:
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, not {router!r}")
    if num_nodes is None:
        num_nodes = count_ult_nodes(node_resource)
    if num_nodes < 1:
        raise ValueError(f"no alive Ray node has the custom resource {node_resource!r}: start each node with "
                         f"ray start --resources='{{\"{node_resource}\": 1, \"{node_resource}_0\": 1}}'")
    node_options: Dict[str, Any] = dict(
        num_replicas=num_nodes,
        max_replicas_per_node=1,
        ray_actor_options={"num_cpus": 0, "resources": {node_resource: node_resource_amount}},
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=health_check_period_s,
        health_check_timeout_s=health_check_timeout_s,
        # Serve's router only knows about the replicas; the first call into a fresh replica should not wait
        # on Serve's default 10 s stats period to learn what its ultd holds.
        request_router_config=RequestRouterConfig(
            request_routing_stats_period_s=stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 4 * stats_period_s),
            **(
                {
                    "request_router_class": UltResidencyRouter,
                    "request_router_kwargs": {
                        "duplicate_discount": duplicate_discount,
                        "spill_queue_depth": spill_queue_depth,
                        "log_decisions": log_decisions,
                    },
                }
                if router == "ult"
                else {}
            ),
        ),
    )
    nodes = UltNode.options(**node_options).bind()
    # The ingress lives on the head node, beside Serve's proxy (HeadOnly): a ult node that leaves must not
    # take the requests of every other node with it. "node:__internal_head__" is the resource Ray gives the
    # head node for this.
    ingress_resources = {"node:__internal_head__": 0.001} if ingress_on_head else {}
    ingress = OpenAIIngress.options(
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "resources": ingress_resources},
        max_ongoing_requests=1000,
    ).bind(nodes, max_attempts=max_attempts, route_timeout_s=route_timeout_s)
    return ingress


def app_builder(args: Dict[str, str]) -> Application:
    """For `serve run ult_serve.app:app_builder key=value ...`: every build_app argument, as text."""
    kinds = {"num_nodes": int, "max_ongoing_requests": int, "max_attempts": int, "spill_queue_depth": int}
    kwargs: Dict[str, Any] = {}
    for key, value in args.items():
        if key in ("router", "node_resource"):
            kwargs[key] = value
        elif key in ("log_decisions", "ingress_on_head"):
            kwargs[key] = value.lower() in ("1", "true", "yes")
        else:
            kwargs[key] = kinds.get(key, float)(value)
    return build_app(**kwargs)
