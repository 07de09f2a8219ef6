"""UltNode: the Ray Serve replica that fronts one node's ultd (one replica per ult node).

It reports ult's view of the node (resident models, free bytes under the ceiling, queue depth, and
PlanLoad's eviction cost for every model not resident) as its routing stats, fails its health check while
its ultd does not answer gRPC Status on the node's Unix socket, and forwards OpenAI-compatible requests to
the node's ultd HTTP API, streaming the answer back chunk by chunk.

Which node it is, and where that node's ultd listens, comes from the node itself, so one deployment serves
every node:
  - ULT_NODE_NAME in the node's environment (the environment `ray start` ran in), else the node's custom
    resource named `ult_node_<something>` (e.g. `ray start --resources='{"ult_node": 1, "ult_node_3": 1}'`),
    else the host name;
  - ULT_SOCKET (default ~/.cache/ult/ultd.sock, ultd's own default) and ULT_HTTP (default 127.0.0.1:8080).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any, AsyncIterator, Dict, Optional, Sequence, Tuple

import grpc
import httpx
import ray
from ray import serve

from .errors import NodeIdentityError, UltdUnavailable
from .ultd import UltdClient, down_view

# Response headers of ultd that the ingress passes on.
PASSED_HEADERS = ("content-type", "retry-after")


def node_identity(resource_prefix: str = "ult_node_") -> Tuple[str, str, str]:
    """(node name, ultd Unix socket path, ultd HTTP host:port) of the node this process runs on."""
    name = os.environ.get("ULT_NODE_NAME", "")
    if not name:
        node_id = ray.get_runtime_context().get_node_id()
        mine = [n for n in ray.nodes() if n.get("NodeID") == node_id]
        if not mine:
            raise NodeIdentityError(f"Ray node {node_id} is not in the cluster's node table")
        names = sorted(k for k in mine[0].get("Resources", {}) if k.startswith(resource_prefix))
        if len(names) > 1:
            raise NodeIdentityError(
                f"Ray node {node_id} has several {resource_prefix}* resources {names}; give it one, or set ULT_NODE_NAME"
            )
        name = names[0] if names else socket.gethostname()
    sock = os.path.expanduser(os.environ.get("ULT_SOCKET", "~/.cache/ult/ultd.sock"))
    http = os.environ.get("ULT_HTTP", "127.0.0.1:8080")
    return name, sock, http


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@serve.deployment(name="UltNode")
class UltNode:
    """One replica per ult node; see the module docstring."""

    async def __init__(self, ready_timeout_s: float = 120.0, request_timeout_s: float = 600.0):
        self.name, self.socket_path, self.http_addr = node_identity()
        self.ultd = UltdClient(self.socket_path)
        self._request_timeout_s = request_timeout_s
        self._http: Optional[httpx.AsyncClient] = None
        # A replica started while its node's ultd is down (Serve replaces a replica whose health check
        # failed) waits here for ultd to answer, so the node rejoins as soon as ultd is back instead of
        # Serve restarting replicas in a loop. Bounded: after ready_timeout_s it fails, and Serve retries.
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                await self.ultd.status()
                break
            except grpc.aio.AioRpcError as e:
                if time.monotonic() > deadline:
                    raise UltdUnavailable(
                        self.name, f"no answer from gRPC Status on {self.ultd.target} for {ready_timeout_s:.0f}s: {_describe(e)}"
                    ) from None
                await asyncio.sleep(0.25)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=f"http://{self.http_addr}",
                timeout=httpx.Timeout(self._request_timeout_s, connect=5.0),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
        return self._http

    async def check_health(self) -> None:
        """Fails while the node's ultd does not answer gRPC Status: Serve then stops routing here."""
        try:
            await self.ultd.status()
        except grpc.aio.AioRpcError as e:
            raise UltdUnavailable(self.name, f"gRPC Status on {self.ultd.target}: {_describe(e)}") from None

    async def record_routing_stats(self) -> Dict[str, Any]:
        """ult's view of this node, for the request router (see ultd.py for its shape)."""
        try:
            return await self.ultd.view(self.name)
        except grpc.aio.AioRpcError as e:
            return down_view(self.name, f"gRPC on {self.ultd.target}: {_describe(e)}")

    def describe(self) -> Dict[str, str]:
        return {"node": self.name, "socket": self.socket_path, "http": self.http_addr}

    async def forward(
        self,
        method: str,
        path: str,
        body: Optional[Dict[str, Any]] = None,
        exclude_nodes: Sequence[str] = (),
    ) -> AsyncIterator[Any]:
        """Sends one OpenAI-compatible request to this node's ultd. Yields {"node": name} at once, then
        {"status": code, "headers": {...}} when ultd answers, then the body as raw byte chunks. Raises
        UltdUnavailable when ultd cannot be reached or drops the connection. (`exclude_nodes` is read by
        the request router, not here.)"""
        yield {"node": self.name}
        where = f"ultd at http://{self.http_addr}"
        try:
            request = self._client().build_request(method, path, json=body)
            response = await self._client().send(request, stream=True)
        except httpx.TransportError as e:
            raise UltdUnavailable(self.name, f"{where} did not answer: {_describe(e)}") from None
        sent = 0
        try:
            yield {
                "status": response.status_code,
                "headers": {k.lower(): v for k, v in response.headers.items() if k.lower() in PASSED_HEADERS},
            }
            async for chunk in response.aiter_raw():
                yield chunk
                sent += 1
        except httpx.TransportError as e:
            raise UltdUnavailable(self.name, f"{where} dropped the connection: {_describe(e)}", sent) from None
        finally:
            await response.aclose()
