"""ult with clients nobody here wrote: the official openai package against the OpenAI-compatible HTTP API,
grpcio stubs generated from proto/ for the gRPC API, grpcio-health-checking, grpcio-reflection, and
prometheus_client's parsers on /metrics. Run by scripts/python-tests.sh, which starts the daemons."""

import base64
import math
import os
import struct

import grpc
import openai
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client import parser as text_parser

from ult.v1 import ult_pb2, ult_pb2_grpc

GRPC = os.environ["ULT_GRPC"]
HTTP = os.environ["ULT_HTTP"]
TIGHT_GRPC = os.environ["ULT_TIGHT_GRPC"]
TIGHT_HTTP = os.environ["ULT_TIGHT_HTTP"]

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def oa():
    return openai.OpenAI(base_url=f"http://{HTTP}/v1", api_key="not-needed", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def stub():
    channel = grpc.insecure_channel(GRPC)
    grpc.channel_ready_future(channel).result(timeout=30)
    return ult_pb2_grpc.UltStub(channel)


PARIS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_chat_completion(oa):
    r = oa.chat.completions.create(model="smollm2", messages=PARIS, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert "Paris" in text
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    assert r.model == "smollm2"
    assert r.usage.prompt_tokens > 10
    assert r.usage.completion_tokens >= 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_streamed_through_a_route(oa):
    stream = oa.chat.completions.create(
        model="chat", messages=PARIS, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage, chunks = "", None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert "Paris" in text
    assert chunks > 3, "streamed in pieces"
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens >= 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_multi_turn_chat_reuses_the_previous_turns_blocks(oa):
    # The client resends the whole conversation each turn, as chat clients do. Turn N+1's rendered prompt
    # starts with turn N's, so at least every whole 16-token block of turn N's prompt comes from the prefix cache.
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}]
    previous = None
    for question in ["What is the capital of France?", "And of Italy?", "And of Spain?", "And of Japan?"]:
        messages.append({"role": "user", "content": question})
        r = oa.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=16)
        cached = r.usage.prompt_tokens_details.cached_tokens
        if previous is not None:
            assert cached >= previous // 16 * 16, (cached, previous)
            assert cached < r.usage.prompt_tokens
        previous = r.usage.prompt_tokens
        messages.append({"role": "assistant", "content": r.choices[0].message.content})


def test_completion_and_its_stream(oa):
    r = oa.completions.create(model="gemma3", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() != ""
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    streamed = "".join(
        c.choices[0].text
        for c in oa.completions.create(
            model="gemma3", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].text, "greedy is deterministic, streamed or not"


def test_same_seed_same_text(oa):
    kwargs = dict(model="gemma3", prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=1234)
    assert oa.completions.create(**kwargs).choices[0].text == oa.completions.create(**kwargs).choices[0].text


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings(oa):
    texts = ["A cat sits on the mat", "A kitten rests on a rug", "Stock markets fell sharply"]
    # The openai package asks for base64 by default and decodes it.
    r = oa.embeddings.create(model="minilm", input=texts)
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert r.usage.prompt_tokens > 10
    one = oa.embeddings.create(model="minilm", input="A cat sits on the mat", encoding_format="float")
    assert max(abs(a - b) for a, b in zip(one.data[0].embedding, vectors[0])) < 1e-5
    raw = requests.post(f"http://{HTTP}/v1/embeddings", json={"model": "minilm", "input": "x", "encoding_format": "base64"}).json()
    decoded = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
    assert abs(sum(v * v for v in decoded) - 1.0) < 1e-4


def test_models_list_with_residency(oa):
    models = {m.id: m for m in oa.models.list().data}
    assert {"smollm2", "gemma3", "minilm", "chat"} <= set(models)
    smol = models["smollm2"].model_extra["ult"]
    assert smol["kind"] == "chat" and smol["state"] in {"resident", "unloaded"}
    assert smol["predicted_bytes"] > 100_000_000
    assert models["chat"].model_extra["ult"]["route"] == ["smollm2"]
    assert models["gemma3"].model_extra["ult"]["completion_only"] is True


def test_error_shapes(oa):
    with pytest.raises(openai.NotFoundError) as e:
        oa.chat.completions.create(model="gpt-9", messages=PARIS)
    assert e.value.status_code == 404
    assert e.value.body["code"] == "model_not_found"
    assert "known models" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model="smollm2", prompt="word " * 3000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "more than 2047 tokens" in e.value.body["message"], "tokenizing stops past the context"
    with pytest.raises(openai.BadRequestError) as e:
        oa.embeddings.create(model="smollm2", input="x")
    assert e.value.body["code"] == "model_not_supported"
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="smollm2", messages=PARIS, n=20)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="smollm2", messages=PARIS, temperature=-1)
    assert e.value.body["param"] == "temperature"
    bad = requests.post(f"http://{HTTP}/v1/chat/completions", data="{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()


def test_memory_exhausted_is_503_with_retry_after():
    # The tight daemon fits smollm2 and minilm, both pinned: gemma3 cannot load and cannot wait.
    tight = ult_pb2_grpc.UltStub(grpc.insecure_channel(TIGHT_GRPC))
    tight.Pin(ult_pb2.PinRequest(model="smollm2"))
    tight.Pin(ult_pb2.PinRequest(model="minilm"))
    for _ in range(600):
        states = {m.name: m.state for m in tight.Status(ult_pb2.StatusRequest()).models}
        if states["smollm2"] == ult_pb2.MODEL_STATE_RESIDENT and states["minilm"] == ult_pb2.MODEL_STATE_RESIDENT:
            break
    r = requests.post(f"http://{TIGHT_HTTP}/v1/completions", json={"model": "gemma3", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 503
    assert int(r.headers["Retry-After"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "insufficient_memory"
    assert "smollm2" in err["message"] and "pinned" in err["message"]
    with pytest.raises(grpc.RpcError) as e:
        list(tight.Generate(ult_pb2.GenerateRequest(model="gemma3", prompt="Hi", max_tokens=2)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_status_and_generate(stub):
    names = {m.name for m in stub.Status(ult_pb2.StatusRequest()).models}
    assert names == {"smollm2", "gemma3", "minilm"}
    request = ult_pb2.GenerateRequest(
        model="smollm2",
        messages=ult_pb2.Messages(messages=[ult_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in PARIS]),
        max_tokens=24,
    )
    text, done = "", None
    for response in stub.Generate(request):
        if response.WhichOneof("event") == "delta":
            text += response.delta
        else:
            done = response.done
    assert "Paris" in text
    assert done.model == "smollm2" and done.finish_reason == ult_pb2.FINISH_REASON_EOS
    assert done.completion_tokens >= 3 and done.decode_tokens_per_s > 0
    with pytest.raises(grpc.RpcError) as e:
        stub.Status(ult_pb2.StatusRequest()) and list(stub.Generate(ult_pb2.GenerateRequest(model="nope", prompt="x")))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_health():
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(GRPC))
    assert health.Check(health_pb2.HealthCheckRequest(service="ult.v1.Ult")).status == health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_reflection_lists_and_describes_services():
    db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(GRPC))
    services = set(db.get_services())
    assert {"ult.v1.Ult", "grpc.health.v1.Health"} <= services
    pool = DescriptorPool(db)
    ult = pool.FindServiceByName("ult.v1.Ult")
    assert {"Load", "Unload", "Status", "Watch", "Generate", "Embed", "Pin", "Unpin", "Lease", "PlanLoad"} <= {
        m.name for m in ult.methods
    }
    assert pool.FindMessageTypeByName("ult.v1.GenerateRequest").fields_by_name["max_tokens"].number == 4


def test_metrics_after_load_generation_and_eviction(oa, stub):
    oa.completions.create(model="gemma3", prompt="Hello", max_tokens=3, temperature=0)
    stub.Unload(ult_pb2.UnloadRequest(model="gemma3"))
    # The unload finishes when the worker has dropped the model.
    for _ in range(600):
        state = {m.name: m.state for m in stub.Status(ult_pb2.StatusRequest()).models}["gemma3"]
        if state == ult_pb2.MODEL_STATE_UNLOADED:
            break
    text = requests.get(f"http://{HTTP}/metrics").text
    families = {f.name: f for f in om_parser.text_string_to_metric_families(text)}
    # The classic text parser reads it as well.
    assert {f.name for f in text_parser.text_string_to_metric_families(text.replace("# EOF\n", ""))}

    def value(family, **labels):
        return sum(s.value for s in families[family].samples if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created"))

    for name in [
        "ult_requests", "ult_tokens", "ult_time_to_first_token_seconds", "ult_load_duration_seconds", "ult_evictions",
        "ult_model_state", "ult_model_predicted_bytes", "ult_model_measured_bytes", "ult_model_kv_budget_tokens",
        "ult_memory_ceiling_bytes", "ult_memory_used_bytes", "ult_memory_available_bytes", "ult_memory_pressure_level",
        "ult_loads_in_flight",
    ]:
        assert name in families, name
    assert value("ult_requests", model="gemma3", kind="generate", outcome="ok") >= 1
    assert value("ult_requests", model="minilm", kind="embed", outcome="ok") >= 1
    assert value("ult_requests", model="gpt-9", outcome="not_found") >= 1
    assert value("ult_tokens", model="gemma3", direction="out") >= 3
    ttft = [s for s in families["ult_time_to_first_token_seconds"].samples if s.name.endswith("_count") and s.labels["model"] == "gemma3"]
    assert ttft and ttft[0].value >= 1
    loads = [s for s in families["ult_load_duration_seconds"].samples if s.name.endswith("_count") and s.labels["model"] == "gemma3"]
    assert loads and loads[0].value >= 1
    assert value("ult_evictions", model="gemma3", reason="explicit") == 1
    assert value("ult_model_state", model="gemma3", state="unloaded") == 1
    assert value("ult_model_state", model="gemma3", state="resident") == 0
    assert value("ult_model_measured_bytes", model="gemma3") > 100_000_000
    assert value("ult_memory_ceiling_bytes") > value("ult_memory_used_bytes") >= 0
    assert value("ult_memory_pressure_level") in (0, 1, 2)
    assert value("ult_loads_in_flight") == 0


def test_llm_d_metrics_parse_and_move_with_load(oa):
    """The model-server metrics the Gateway API Inference Extension's endpoint picker (llm-d) scrapes, under
    vLLM's names: they parse with prometheus_client and move with load."""

    def scrape():
        text = requests.get(f"http://{HTTP}/metrics").text
        families = {f.name: f for f in om_parser.text_string_to_metric_families(text)}
        for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]:
            assert families[name].type == "gauge", name
        return {
            name: {s.labels["model_name"]: s.value for s in families[name].samples}
            for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
        }

    stream = oa.chat.completions.create(
        model="smollm2", messages=PARIS, temperature=0, max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    during = None
    for i, _chunk in enumerate(stream):
        if i == 5:
            during = scrape()
    after = scrape()
    assert during["vllm:num_requests_running"]["smollm2"] == 1, during
    assert 0 < during["vllm:kv_cache_usage_perc"]["smollm2"] <= 1, during
    assert after["vllm:num_requests_running"]["smollm2"] == 0, after
    assert after["vllm:num_requests_waiting"]["smollm2"] == 0, after
