"""OpenAIIngress: the FastAPI deployment behind Ray Serve's HTTP proxy that serves OpenAI-compatible
chat/completions/embeddings by calling the UltNode deployment with the request's "model" as Ray's
multiplexed model id (which the residency-aware router reads).

Faults. A request that has sent nothing to its client is retried on another node when its node fails —
ultd unreachable or dropping the connection, or the node's replica dying (its Ray node leaving) — up to
`max_attempts` attempts, each failed node excluded from the next attempt (the router reads the
exclusions). A 503 from ultd (no memory for the load now, or the load outlasted ultd's load_wait) is
retried after its Retry-After (at most 2 s) without excluding the node: the router routes it again on
its latest view, which sends it back where the model is now loading or resident rather than starting a
second load elsewhere, and elsewhere when that node cannot load it. Nothing has been sent until the first body chunk of the answer
has arrived: a non-streamed answer is held until complete, so it is always retried; a streamed one is
retried until its first token. A stream that fails after that cannot be replayed invisibly (the client has
tokens), so it ends with an SSE error event naming the node, and no `data: [DONE]`. When every attempt
failed the answer is HTTP 502 naming each node and what happened there; when no replica accepted the
request within `route_timeout_s`, 503. Responses carry `x-ult-node` (the node that answered) and
`x-ult-attempts`. GET /ult/routing shows the router's current view of every node.
"""

# No `from __future__ import annotations` here: FastAPI must see the endpoints' real annotations (Request).
import asyncio
import json
import logging
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from .errors import UltdUnavailable
from .router import snapshot

logger = logging.getLogger("ray.serve")

api = FastAPI(title="ult behind Ray Serve")


def _cause(exc: BaseException) -> BaseException:
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


def openai_error(status: int, message: str, kind: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status, **extra}})


def sse_error(node: str, message: str) -> bytes:
    event = {"error": {"message": message, "type": "ult_node_failed", "code": 502, "node": node}}
    # The blank line first ends any event the failure cut in half.
    return b"\n\ndata: " + json.dumps(event).encode() + b"\n\n"


class NodeFailed(Exception):
    """One attempt failed before anything reached the client (internal to the ingress)."""

    def __init__(self, node: Optional[str], message: str):
        super().__init__(node, message)
        self.node = node
        self.message = message


class Busy(Exception):
    """ultd answered 503 to one attempt: try again after `retry_after_s` (internal to the ingress)."""

    def __init__(self, node: str, message: str, retry_after_s: float):
        super().__init__(node, message, retry_after_s)
        self.node = node
        self.message = message
        self.retry_after_s = retry_after_s


def _retry_after(value: Optional[str], cap_s: float = 2.0) -> float:
    try:
        return min(max(float(value), 0.0), cap_s) if value else 1.0
    except ValueError:
        return 1.0


@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, nodes: DeploymentHandle, max_attempts: int = 3, route_timeout_s: float = 60.0):
        self.nodes = nodes
        self.max_attempts = max_attempts
        self.route_timeout_s = route_timeout_s

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._serve(request, "/v1/chat/completions")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "/v1/completions")

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._serve(request, "/v1/embeddings")

    @api.get("/v1/models")
    async def models(self) -> Response:
        return await self._attempts("GET", "/v1/models", None, "", stream=False)

    @api.get("/ult/routing")
    async def routing(self) -> Response:
        """What the residency-aware router believes about each node now (empty before its first request,
        and with Ray's default router)."""
        return JSONResponse({"routers": snapshot()})

    async def _serve(self, request: Request, path: str) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            return openai_error(400, f"the request body is not JSON: {e}", "invalid_request_error")
        if not isinstance(body, dict):
            return openai_error(400, "the request body must be a JSON object", "invalid_request_error")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return openai_error(400, "`model` is required and must be a string", "invalid_request_error", param="model")
        return await self._attempts("POST", path, body, model, stream=bool(body.get("stream")))

    async def _attempts(self, method: str, path: str, body: Optional[Dict[str, Any]], model: str, stream: bool) -> Response:
        tried: List[str] = []
        failures: List[str] = []
        for attempt in range(1, self.max_attempts + 1):
            handle = self.nodes.options(multiplexed_model_id=model, stream=True)
            gen = handle.forward.remote(method, path, body, exclude_nodes=list(tried))
            try:
                return await self._one(gen, stream, attempt, last=attempt == self.max_attempts)
            except asyncio.TimeoutError:
                gen.cancel()
                return openai_error(
                    503, f"no ult node accepted the request within {self.route_timeout_s:.0f}s", "ult_no_node_available"
                )
            except Busy as b:
                gen.cancel()
                failures.append(b.message)
                logger.warning("ult ingress: attempt %d of %s %s: %s; retrying in %.1fs", attempt, method, path, b.message, b.retry_after_s)
                await asyncio.sleep(b.retry_after_s)  # the server's own Retry-After, not a readiness wait
            except NodeFailed as f:
                gen.cancel()
                failures.append(f.message)
                if f.node:
                    tried.append(f.node)
                logger.warning("ult ingress: attempt %d of %s %s failed: %s", attempt, method, path, f.message)
            except Exception as e:
                gen.cancel()
                logger.exception("ult ingress: %s %s failed unexpectedly", method, path)
                return openai_error(500, f"ult ingress: {type(e).__name__}: {e}", "internal_error")
        return openai_error(
            502,
            f"the request failed on {len(failures)} ult node(s): " + "; ".join(failures),
            "ult_node_unavailable",
            nodes=tried,
        )

    async def _one(self, gen: Any, stream: bool, attempt: int, last: bool) -> Response:
        """One attempt: returns the response, or raises NodeFailed while nothing has reached the client."""
        node: Optional[str] = None
        try:
            hello = await asyncio.wait_for(gen.__anext__(), self.route_timeout_s)
            node = hello["node"]
            head = await gen.__anext__()
            status, headers = head["status"], dict(head["headers"])
            headers.update({"x-ult-node": node, "x-ult-attempts": str(attempt)})
            if status == 503 and not last:
                detail = b"".join([c async for c in gen]).decode(errors="replace")
                raise Busy(node, f"ult node {node}: ultd answered 503: {detail}", _retry_after(headers.get("retry-after")))
            if not stream or status != 200:
                content = b"".join([c async for c in gen])
                media = headers.pop("content-type", "application/json")
                return Response(content=content, status_code=status, media_type=media, headers=headers)
            first = await self._first_chunk(gen)
        except StopAsyncIteration:
            where = f"ult node {node}" if node else "a ult node"
            raise NodeFailed(node, f"{where}: the replica ended the call before ultd's answer") from None
        except (asyncio.TimeoutError, NodeFailed, Busy):
            raise
        except Exception as e:  # Ray wraps what the replica raised; sort it out by its cause.
            raise NodeFailed(*self._failure(e, node)) from None
        media = headers.pop("content-type", "text/event-stream")
        return StreamingResponse(self._relay(first, gen, node), status_code=200, media_type=media, headers=headers)

    @staticmethod
    async def _first_chunk(gen: Any) -> bytes:
        try:
            return await gen.__anext__()
        except StopAsyncIteration:
            return b""

    @staticmethod
    def _failure(exc: BaseException, node: Optional[str]) -> Tuple[Optional[str], str]:
        cause = _cause(exc)
        if isinstance(cause, UltdUnavailable):
            return cause.node, str(cause)
        if isinstance(exc, RayActorError) or isinstance(cause, RayActorError):
            where = f"ult node {node}" if node else "a ult node"
            return node, f"{where}: its replica died (is its Ray node gone?): {type(cause).__name__}"
        raise exc

    async def _relay(self, first: bytes, gen: Any, node: str) -> AsyncIterator[bytes]:
        sent = 0
        finished = False
        try:
            if first:
                yield first
                sent += 1
            async for chunk in gen:
                yield chunk
                sent += 1
            finished = True
        except Exception as e:
            finished = True
            cause = _cause(e)
            if isinstance(cause, UltdUnavailable) or isinstance(cause, RayActorError) or isinstance(e, RayActorError):
                detail = cause.detail if isinstance(cause, UltdUnavailable) else f"its replica died: {type(cause).__name__}"
                message = (
                    f"ult node {node} failed after streaming {sent} chunk(s): {detail}; "
                    "the answer is incomplete and was not retried (tokens had already been sent)"
                )
                logger.warning("ult ingress: %s", message)
                yield sse_error(node, message)
            else:
                raise
        finally:
            if not finished:
                # The client went away: the replica stops, and ultd frees the sequence.
                gen.cancel()
