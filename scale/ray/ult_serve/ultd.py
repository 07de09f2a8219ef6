"""A node's ultd as its replica sees it: the gRPC client (Status, PlanLoad over the local Unix socket) and the
routing view built from them, which the replica reports to the request router as its routing stats.

The view is a plain dict (it travels through Ray Serve's controller to every router):

    {"v": 1, "node": "ult_node_0", "up": True, "error": "", "at": <unix seconds of the snapshot>,
     "ceiling_bytes": .., "used_bytes": .., "free_bytes": ..,
     "resident": ["smollm2", ...],           # resident or loading now
     "queue": 3,                              # in flight + queued over all models
     "models": {"smollm2": {"state": "resident", "queue": 2, "loads": 1, "score": 4140.7,
                            "charged_bytes": ..}, ...},
     "names": {"chat": ["smollm2"], "smol": ["smollm2"], "smollm2": ["smollm2"], ...},
     "plans": {"gemma3": {"fits": True, "need_bytes": .., "free_bytes": .., "refusal": "",
                          "evictions": [["smollm2", <bytes>, <score>], ...]}, ...}}

`plans` holds PlanLoad's answer for every model that is not resident: what loading it here would evict.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import grpc

from .proto import ult_pb2, ult_pb2_grpc

STATE_NAMES = {
    ult_pb2.MODEL_STATE_UNLOADED: "unloaded",
    ult_pb2.MODEL_STATE_LOADING: "loading",
    ult_pb2.MODEL_STATE_RESIDENT: "resident",
    ult_pb2.MODEL_STATE_UNLOADING: "unloading",
    ult_pb2.MODEL_STATE_FAILED: "failed",
}
HELD_STATES = ("resident", "loading")
# gRPC Python sends the socket path as the :authority of a unix: target, which ultd's HTTP/2 server refuses
# (RST_STREAM, PROTOCOL_ERROR); a plain host name works. Reconnect backoff is capped at 1 s (gRPC's default
# grows to 2 minutes), so a replica notices a restarted ultd at once and its node rejoins.
CHANNEL_OPTIONS = [
    ("grpc.default_authority", "localhost"),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def view_from(node: str, status: Any, plans: Dict[str, Any]) -> Dict[str, Any]:
    """Builds the routing view from a StatusResponse and PlanLoadResponses (by model name)."""
    models: Dict[str, Dict[str, Any]] = {}
    names: Dict[str, list] = {}
    resident = []
    queue = 0
    for m in status.models:
        state = STATE_NAMES.get(m.state, "unknown")
        q = int(m.in_flight) + int(m.queued)
        queue += q
        models[m.name] = {
            "state": state,
            "queue": q,
            "loads": int(m.loads),
            "score": float(m.score),
            "charged_bytes": int(m.charged_bytes),
        }
        if state in HELD_STATES:
            resident.append(m.name)
        names[m.name] = [m.name]
        for alias in m.aliases:
            names[alias] = [m.name]
    for r in status.routes:
        names[r.name] = list(r.models)
    return {
        "v": 1,
        "node": node,
        "up": True,
        "error": "",
        "at": time.time(),
        "ceiling_bytes": int(status.daemon.ceiling_bytes),
        "used_bytes": int(status.daemon.used_bytes),
        "free_bytes": int(status.daemon.free_bytes),
        "resident": resident,
        "queue": queue,
        "models": models,
        "names": names,
        "plans": {
            name: {
                "fits": bool(p.fits),
                "need_bytes": int(p.need_bytes),
                "free_bytes": int(p.free_bytes),
                "refusal": p.refusal,
                "evictions": [[e.model, int(e.bytes), float(e.score)] for e in p.evictions],
            }
            for name, p in plans.items()
        },
    }


def down_view(node: str, error: str) -> Dict[str, Any]:
    """The view of a node whose ultd does not answer: the router sends it nothing while others are up."""
    return {"v": 1, "node": node, "up": False, "error": error, "at": time.time()}


class UltdClient:
    """An asyncio gRPC client of one ultd on its Unix socket. Create and use it on one event loop."""

    def __init__(self, socket_path: str, timeout_s: float = 3.0):
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._channel: Optional[grpc.aio.Channel] = None
        self._stub: Optional[ult_pb2_grpc.UltStub] = None

    @property
    def target(self) -> str:
        return f"unix://{self.socket_path}"

    def _ult(self) -> ult_pb2_grpc.UltStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            self._stub = ult_pb2_grpc.UltStub(self._channel)
        return self._stub

    async def status(self) -> Any:
        return await self._ult().Status(ult_pb2.StatusRequest(), timeout=self.timeout_s)

    async def plan_load(self, model: str) -> Any:
        return await self._ult().PlanLoad(ult_pb2.PlanLoadRequest(model=model), timeout=self.timeout_s)

    async def view(self, node: str) -> Dict[str, Any]:
        """Status, then PlanLoad for every model that is not resident. Raises grpc.aio.AioRpcError."""
        status = await self.status()
        plans = {}
        for m in status.models:
            if STATE_NAMES.get(m.state) not in HELD_STATES:
                plans[m.name] = await self.plan_load(m.name)
        return view_from(node, status, plans)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
