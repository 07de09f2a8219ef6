"""The test and benchmark harness: real ultd processes, a real local Ray cluster of N nodes (one ultd each),
Ray Serve with both routers side by side, the skewed workload, and load counts read from each ultd.

Used by the pytest suite (conftest.py) and by bench.py. Everything it starts it stops in `close()`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import grpc
import httpx

REPO = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("ULT_CACHE", Path.home() / ".cache" / "ult"))
ULTD = Path(os.environ.get("ULTD", CACHE / "target" / "debug" / "ultd"))
MODELS = {"smollm2": "chat", "gemma3": "completion", "minilm": "embedding"}


class HarnessError(Exception):
    """Something the harness started did not come up, or a bounded wait ran out."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout_s: float, every_s: float = 0.2):
    """Polls check() until it returns something truthy; raises HarnessError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # the thing polled is not up yet
            last_error = e
        time.sleep(every_s)
    raise HarnessError(f"timed out after {timeout_s:.0f}s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


def ultd_config(root: Path, sock: Path, http_port: int, ceiling: str) -> str:
    return f"""# ultd config for one ult node of the Ray Serve tests
[daemon]
listen = "127.0.0.1:0"
http = "127.0.0.1:{http_port}"
ollama = "off"
socket = "{sock}"
state_file = "off"
memory_ceiling = "{ceiling}"
headroom = "0"
load_wait = "5s"
[models.smollm2]
path = "{root}/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
kind = "chat"
context = 2048
max_sequences = 4
[models.gemma3]
path = "{root}/models/gemma3/gemma-3-270m-q4_k_m.gguf"
kind = "completion"
context = 1024
max_sequences = 4
[models.minilm]
path = "{root}/models/minilm"
kind = "embedding"
context = 256
[routes.chat]
models = ["smollm2"]
"""


class Ultd:
    """One real ultd process on its own socket and fixed HTTP port (kept across restarts)."""

    def __init__(self, name: str, work: Path, ceiling: str):
        self.name = name
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = self.dir / "ultd.sock"
        self.http_port = free_port()
        self.config = self.dir / "ultd.toml"
        self.config.write_text(ultd_config(REPO, self.sock, self.http_port, ceiling))
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 60.0) -> None:
        if not ULTD.is_file():
            raise HarnessError(f"ultd binary not found at {ULTD} (set ULTD, or build it with cargo build -p ultd)")
        self.starts += 1
        out = open(self.dir / f"stdout.{self.starts}", "w")
        err = open(self.dir / f"stderr.{self.starts}", "w")
        self.proc = subprocess.Popen([str(ULTD), "--config", str(self.config)], stdout=out, stderr=err)
        ready = self.dir / f"stdout.{self.starts}"

        def listening():
            if self.proc.poll() is not None:
                raise HarnessError(f"ultd {self.name} exited with {self.proc.returncode}: {(self.dir / f'stderr.{self.starts}').read_text()[-2000:]}")
            return "ultd listening on" in ready.read_text()

        wait_for(f"ultd {self.name} to print its ready line", listening, timeout_s, every_s=0.1)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean shutdown, connections dropped mid-answer."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def _stub(self):
        from ult_serve.proto import ult_pb2_grpc
        from ult_serve.ultd import CHANNEL_OPTIONS

        channel = grpc.insecure_channel(f"unix://{self.sock}", options=CHANNEL_OPTIONS)
        return channel, ult_pb2_grpc.UltStub(channel)

    def status(self):
        from ult_serve.proto import ult_pb2

        channel, stub = self._stub()
        try:
            return stub.Status(ult_pb2.StatusRequest(), timeout=5)
        finally:
            channel.close()

    def loads(self) -> Dict[str, int]:
        return {m.name: int(m.loads) for m in self.status().models}

    def resident(self) -> List[str]:
        from ult_serve.proto import ult_pb2

        return sorted(m.name for m in self.status().models if m.state in (ult_pb2.MODEL_STATE_RESIDENT, ult_pb2.MODEL_STATE_LOADING))

    def unload(self, model: str) -> None:
        from ult_serve.proto import ult_pb2

        channel, stub = self._stub()
        try:
            stub.Unload(ult_pb2.UnloadRequest(model=model), timeout=30)
        finally:
            channel.close()

    def unload_all(self) -> None:
        from ult_serve.proto import ult_pb2

        channel, stub = self._stub()
        try:
            for m in stub.Status(ult_pb2.StatusRequest(), timeout=5).models:
                if m.state == ult_pb2.MODEL_STATE_RESIDENT:
                    stub.Unload(ult_pb2.UnloadRequest(model=m.name), timeout=30)
        finally:
            channel.close()


class Stack:
    """N ult nodes (ultd + Ray node with custom resources ult_node and ult_node_<i>) and Ray Serve with
    two applications over the same nodes: /ult (residency-aware routing) and /default (Ray's default
    power-of-two-choices routing)."""

    def __init__(self, work: Path, nodes: int = 3, ceiling: str = "700MiB"):
        self.work = work
        self.ultds = [Ultd(f"ult_node_{i}", work, ceiling) for i in range(nodes)]
        self.cluster = None
        self.ray_nodes: List[Any] = []
        self.http_port = free_port()

    def node_args(self, i: int) -> Dict[str, Any]:
        u = self.ultds[i]
        return dict(
            num_cpus=1,
            resources={"ult_node": 1, f"ult_node_{i}": 1},
            env_vars={"ULT_SOCKET": str(u.sock), "ULT_HTTP": u.http},
            object_store_memory=80 * 1024 * 1024,
        )

    def start(self) -> None:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from ult_serve.app import build_app

        for u in self.ultds:
            u.start()
        head = dict(self.node_args(0), include_dashboard=False)
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.ray_nodes = [self.cluster.head_node]
        for i in range(1, len(self.ultds)):
            self.ray_nodes.append(self.cluster.add_node(**self.node_args(i)))
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, logging_level="WARNING", log_to_driver=False)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.http_port})
        n = len(self.ultds)
        serve.run(build_app(router="ult", num_nodes=n, log_decisions=bool(os.environ.get("ULT_RAY_LOG_ROUTING"))), name="ult", route_prefix="/ult", blocking=False)
        serve.run(build_app(router="default", num_nodes=n), name="default", route_prefix="/default", blocking=False)
        self.wait_running(n)

    def running_replicas(self) -> Dict[str, int]:
        from ray import serve

        apps = serve.status().applications
        out = {}
        for name in ("ult", "default"):
            app = apps.get(name)
            dep = app.deployments.get("UltNode") if app else None
            out[name] = dep.replica_states.get("RUNNING", 0) if dep else 0
        return out

    def wait_running(self, n: int, timeout_s: float = 180.0) -> None:
        from ray import serve

        def ready():
            apps = serve.status().applications
            if any(apps.get(a) is None or apps[a].status != "RUNNING" for a in ("ult", "default")):
                return False
            return all(v == n for v in self.running_replicas().values())

        wait_for(f"both Serve applications to run {n} UltNode replicas", ready, timeout_s, every_s=0.5)

    def url(self, app: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/{app}"

    def loads(self) -> Dict[str, Dict[str, int]]:
        return {u.name: u.loads() for u in self.ultds}

    def routing_view(self, app: str = "ult") -> List[Dict[str, Any]]:
        """The residency router's view of each replica (GET /ult/routing), [] before it has routed."""
        r = httpx.get(self.url(app) + "/ult/routing", timeout=10)
        r.raise_for_status()
        return [rep for router in r.json()["routers"] for rep in router["replicas"]]

    def wait_view_fresh(self, since: float, timeout_s: float = 30.0) -> None:
        """Waits until the router has a report taken after `since` from every replica, and each matches
        what its ultd holds now, so that what the test changed directly on the ultds is what it routes by."""
        def fresh():
            view = self.routing_view("ult")
            truth = {u.name: u.resident() for u in self.ultds}
            if view and sorted(rep["node"] for rep in view) != sorted(truth):
                return False  # a replica (re)joining has not reached the router yet
            return all(rep["up"] and rep["reported_at"] > since and rep["resident"] == truth[rep["node"]] for rep in view)

        wait_for("the router's view of every node to catch up", fresh, timeout_s, every_s=0.2)

    def reset(self) -> None:
        """Unloads every model on every node, so that a phase starts cold, and waits until the router
        has seen it."""
        for u in self.ultds:
            u.unload_all()
        wait_for("every model to be unloaded", lambda: not any(u.resident() for u in self.ultds), 30)
        self.wait_view_fresh(time.time())

    def close(self) -> None:
        try:
            from ray import serve
            import ray

            if ray.is_initialized():
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
        finally:
            if self.cluster is not None:
                self.cluster.shutdown()
            for u in self.ultds:
                u.stop()


# --- The workload -------------------------------------------------------------------------------------

SKEW = (("smollm2", 0.6), ("minilm", 0.25), ("gemma3", 0.15))
PROMPTS = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three.", "What is 2+2?"]


def skewed_requests(n: int, seed: int, max_tokens: int = 4) -> List[Dict[str, Any]]:
    """n requests over the three shipped models with a skewed mix (60% smollm2 chat, 25% minilm
    embeddings, 15% gemma3 completions), the same list for the same seed; generation is streamed."""
    rng = random.Random(seed)
    names = [m for m, _ in SKEW]
    weights = [w for _, w in SKEW]
    out = []
    for i in range(n):
        model = rng.choices(names, weights)[0]
        text = rng.choice(PROMPTS)
        if model == "smollm2":
            body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True}
            path = "/v1/chat/completions"
        elif model == "gemma3":
            body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            path = "/v1/completions"
        else:
            body = {"model": model, "input": [text]}
            path = "/v1/embeddings"
        out.append({"i": i, "model": model, "path": path, "body": body})
    return out


@dataclass
class Outcome:
    """What happened to one request, as the client saw it."""

    i: int
    model: str
    status: int = 0
    node: str = ""
    attempts: int = 0
    ok: bool = False
    error: str = ""
    ttft_s: Optional[float] = None
    total_s: float = 0.0
    chunks: int = 0
    started: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)


def send(client: httpx.Client, base: str, req: Dict[str, Any]) -> Outcome:
    """Sends one request; classifies the answer as complete (ok), a clear error (error set), or neither."""
    o = Outcome(i=req["i"], model=req["model"], started=time.monotonic())
    t0 = time.monotonic()
    try:
        if req["body"].get("stream"):
            with client.stream("POST", base + req["path"], json=req["body"]) as r:
                o.status = r.status_code
                o.node = r.headers.get("x-ult-node", "")
                o.attempts = int(r.headers.get("x-ult-attempts", "0") or 0)
                if r.status_code != 200:
                    o.error = r.read().decode(errors="replace")
                else:
                    done = False
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[len("data: "):]
                        if data == "[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if "error" in event:
                            o.error = event["error"].get("message", data)
                            break
                        if o.ttft_s is None:
                            o.ttft_s = time.monotonic() - t0
                        o.chunks += 1
                    o.ok = done and not o.error
                    if not done and not o.error:
                        o.error = "SILENT: the stream ended without [DONE] and without an error event"
        else:
            r = client.post(base + req["path"], json=req["body"])
            o.status = r.status_code
            o.node = r.headers.get("x-ult-node", "")
            o.attempts = int(r.headers.get("x-ult-attempts", "0") or 0)
            o.ttft_s = time.monotonic() - t0
            if r.status_code == 200:
                data = r.json()
                o.ok = bool(data.get("data") or data.get("choices"))
                if not o.ok:
                    o.error = f"SILENT: 200 without data: {r.text[:200]}"
            else:
                o.error = r.text
    except httpx.HTTPError as e:
        o.error = f"SILENT: transport error {type(e).__name__}: {e}"
    o.total_s = time.monotonic() - t0
    return o


def run_workload(base: str, requests: List[Dict[str, Any]], concurrency: int, on_done=None, timeout_s: float = 300.0) -> List[Outcome]:
    """Sends the requests in order with `concurrency` clients; calls on_done(outcome) as each finishes."""
    outcomes: List[Outcome] = []
    with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0)) as client:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(send, client, base, r) for r in requests]
            for f in concurrent.futures.as_completed(futures):
                o = f.result()
                outcomes.append(o)
                if on_done:
                    on_done(o)
    return sorted(outcomes, key=lambda o: o.i)


def total_loads(before: Dict[str, Dict[str, int]], after: Dict[str, Dict[str, int]]) -> Dict[str, int]:
    """Loads per model over all nodes between two snapshots of Stack.loads()."""
    out: Dict[str, int] = {m: 0 for m in MODELS}
    for node, per in after.items():
        for m, n in per.items():
            out[m] = out.get(m, 0) + n - before.get(node, {}).get(m, 0)
    return out


def percentile(values: List[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
