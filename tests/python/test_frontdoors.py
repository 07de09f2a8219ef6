"""Every client already written works: the official ollama package against ult's Ollama API, the official
openai package's tool calls, structured output and logprobs, and `ultctl generate --json-schema` over gRPC.
Answers are checked by code nobody here wrote: pydantic validates structured output against the schema
it came from, and the openai/ollama packages parse every response into their own types. Run by
scripts/python-tests.sh, which starts the daemons."""

import json
import math
import os
import subprocess
import time

import ollama
import openai
import pydantic
import pytest

from ult.v1 import ult_pb2, ult_pb2_grpc
import grpc

GRPC = os.environ["ULT_GRPC"]
HTTP = os.environ["ULT_HTTP"]
OLLAMA = os.environ["ULT_OLLAMA"]
ULTCTL = os.environ["ULTCTL"]

pytestmark = pytest.mark.timeout(180)

PARIS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
GREEDY = {"temperature": 0, "num_predict": 24}


class City(pydantic.BaseModel):
    # Bounded, so the grammar ends the answer: a 135M model given an unbounded integer may write 1s forever.
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population: int = pydantic.Field(ge=0, le=1_000_000_000)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def ol():
    return ollama.Client(host=f"http://{OLLAMA}", timeout=120)


@pytest.fixture(scope="module")
def oa():
    return openai.OpenAI(base_url=f"http://{HTTP}/v1", api_key="not-needed", timeout=120, max_retries=0)


def resident(name):
    stub = ult_pb2_grpc.UltStub(grpc.insecure_channel(GRPC))
    states = {m.name: m.state for m in stub.Status(ult_pb2.StatusRequest()).models}
    return states[name] == ult_pb2.MODEL_STATE_RESIDENT


# --- Ollama -------------------------------------------------------------------------------------------


def test_ollama_chat_streamed_and_not(ol):
    whole = ol.chat(model="smollm2", messages=PARIS, options=GREEDY)
    assert isinstance(whole, ollama.ChatResponse)
    assert whole.done and whole.done_reason in ("stop", "length")
    assert "Paris" in whole.message.content
    assert whole.prompt_eval_count > 0 and whole.eval_count > 0 and whole.total_duration > 0
    chunks = list(ol.chat(model="smollm2", messages=PARIS, options=GREEDY, stream=True))
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert "".join(c.message.content for c in chunks) == whole.message.content, "greedy: same text streamed"


def test_ollama_generate_uses_the_template_and_raw_does_not(ol):
    r = ol.generate(model="smollm2:latest", prompt="What is the capital of France?", system="You are a helpful assistant.", options=GREEDY)
    assert r.done and "Paris" in r.response
    raw = ol.generate(model="gemma3", prompt="The capital of France is", raw=True, options={"temperature": 0, "num_predict": 8})
    assert raw.done and raw.eval_count > 0 and raw.response


def test_ollama_embed_matches_the_openai_endpoint(ol, oa):
    e = ol.embed(model="minilm", input=["a cat sits on the mat", "stock markets fell"])
    assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 384
    ref = oa.embeddings.create(model="minilm", input=["a cat sits on the mat"]).data[0].embedding
    assert max(abs(a - b) for a, b in zip(e.embeddings[0], ref)) < 1e-6
    legacy = ol.embeddings(model="minilm", prompt="a cat sits on the mat")
    assert max(abs(a - b) for a, b in zip(legacy.embedding, ref)) < 1e-6
    # Ollama truncates an input longer than the context unless told not to.
    long = ol.embed(model="minilm", input="word " * 1000)
    assert long.prompt_eval_count == 256
    with pytest.raises(ollama.ResponseError) as e:
        ol.embed(model="minilm", input="word " * 1000, truncate=False)
    assert e.value.status_code == 400
    short = ol.embed(model="minilm", input="a cat", dimensions=8)
    assert len(short.embeddings[0]) == 8
    assert abs(math.sqrt(sum(x * x for x in short.embeddings[0])) - 1) < 1e-5


def test_ollama_list_ps_show(ol):
    names = {m.model for m in ol.list().models}
    assert {"smollm2", "gemma3", "minilm"} <= names
    ol.chat(model="smollm2", messages=PARIS, options=GREEDY)
    ps = {m.model: m for m in ol.ps().models}
    assert "smollm2" in ps
    assert ps["smollm2"].context_length == 2048 and ps["smollm2"].size > 50_000_000
    show = ol.show("smollm2")
    assert "completion" in show.capabilities and show.modelinfo["general.architecture"] == "llama"
    assert "im_start" in show.template


def test_ollama_keep_alive_zero_unloads_after_answering(ol):
    r = ol.chat(model="smollm2", messages=PARIS, options=GREEDY, keep_alive=0)
    assert "Paris" in r.message.content
    for _ in range(1200):  # up to a minute: a bound for a loaded machine, not a speed
        if not resident("smollm2"):
            break
        time.sleep(0.05)
    assert not resident("smollm2"), "keep_alive=0 unloads the model once it is idle"
    assert "smollm2" not in {m.model for m in ol.ps().models}


def test_ollama_format_schema_answer_parses(ol):
    r = ol.chat(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe Paris as JSON with its name, country and population."}],
        format=City.model_json_schema(),
        options={"temperature": 0, "num_predict": 120},
    )
    city = City.model_validate_json(r.message.content)
    assert city.name
    # A free-form object has no bound: it parses when it ends, or num_predict cut it (then only by length).
    r = ol.generate(model="smollm2", prompt="Reply with a JSON object about a cat.", format="json", options={"temperature": 0, "num_predict": 200})
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.response), dict)
    else:
        assert r.done_reason == "length" and r.response.lstrip().startswith("{"), r
    # Gemma's SentencePiece vocabulary of 262k pieces, through the same grammar index.
    r = ol.generate(model="gemma3", prompt="A JSON object describing a cat:", raw=True, format=City.model_json_schema(), options={"temperature": 0, "num_predict": 120})
    assert r.done_reason == "stop", "the bounded grammar completes inside 120 tokens"
    City.model_validate_json(r.response)


def test_ollama_refuses_what_ult_does_not_do(ol):
    with pytest.raises(ollama.ResponseError) as e:
        ol.pull("llama3")
    assert e.value.status_code == 501 and "models.toml" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ol.chat(model="smollm2", messages=PARIS, think=True)
    assert e.value.status_code == 400 and "does not support thinking" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ol.chat(model="smollm2", messages=PARIS, options={"mirostat": 2})
    assert "mirostat" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ol.chat(model="no-such-model", messages=PARIS)
    assert e.value.status_code == 404


# --- OpenAI -------------------------------------------------------------------------------------------


def test_openai_tool_call_round_trip(oa):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oa.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1, "parallel_tool_calls=False: one call"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str) and args["city"]
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": args["city"], "sky": "sunny", "celsius": 21})})
    final = oa.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=48)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content.strip()


def test_openai_tool_call_streamed_as_deltas(oa):
    stream = oa.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=64, stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        for c in chunk.choices:
            for t in c.delta.tool_calls or []:
                name += t.function.name or ""
                arguments += t.function.arguments or ""
            finish = c.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    assert "city" in json.loads(arguments)


def test_openai_json_schema_output_validates(oa):
    r = oa.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe Paris with its name, country and population."}],
        response_format=City,
        temperature=0,
        max_tokens=120,
    )
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name
    City.model_validate_json(r.choices[0].message.content)
    obj = oa.chat.completions.create(model="smollm2", messages=PARIS, response_format={"type": "json_object"}, temperature=0, max_tokens=40)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_openai_logprobs(oa):
    r = oa.chat.completions.create(model="smollm2", messages=PARIS, logprobs=True, top_logprobs=3, temperature=0, max_tokens=12)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # Greedy picks the most likely token: it is the first alternative, with its log-probability.
        assert t.token == t.top_logprobs[0].token and abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-4
    assert b"".join(bytes(t.bytes) for t in content).decode() == r.choices[0].message.content
    c = oa.completions.create(model="gemma3", prompt="The capital of France is", logprobs=2, temperature=0, max_tokens=5)
    assert len(c.choices[0].logprobs.tokens) == len(c.choices[0].logprobs.token_logprobs) == c.usage.completion_tokens


def test_openai_n_choices_and_named_refusals(oa):
    r = oa.chat.completions.create(model="smollm2", messages=PARIS, n=2, temperature=1, seed=5, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="smollm2", messages=PARIS, extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate" and "frobnicate" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="smollm2", messages=PARIS, frequency_penalty=0.5)
    assert e.value.body["param"] == "frequency_penalty"
    # llama.cpp's cache_prompt: true is what ult does, false is refused by name.
    ok = oa.completions.create(model="smollm2", prompt="The sky is", max_tokens=2, extra_body={"cache_prompt": True})
    assert ok.choices[0].text is not None
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model="smollm2", prompt="The sky is", max_tokens=2, extra_body={"cache_prompt": False})
    assert e.value.body["param"] == "cache_prompt"
    # Hints OpenAI documents as ignorable are accepted.
    ok = oa.chat.completions.create(model="smollm2", messages=PARIS, user="u1", store=False, metadata={"k": "v"}, temperature=0, max_tokens=4)
    assert ok.choices[0].message.content


def test_models_list_context_lengths(oa):
    models = {m.id: m for m in oa.models.list().data}
    assert models["smollm2"].model_extra["ult"]["context_tokens"] == 2048


# --- gRPC through ultctl ------------------------------------------------------------------------------


def test_ultctl_generate_json_schema(tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(City.model_json_schema()))
    out = subprocess.run(
        [ULTCTL, "--addr", GRPC, "--json", "generate", "smollm2", "Describe Paris with its name, country and population.",
         "--chat", "--temperature", "0", "--max-tokens", "120", "--json-schema", str(schema)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    result = json.loads(out.stdout)
    City.model_validate_json(result["text"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"type": "strin"}}}')
    failed = subprocess.run(
        [ULTCTL, "--addr", GRPC, "generate", "smollm2", "x", "--chat", "--json-schema", str(bad)],
        capture_output=True, text=True, timeout=60,
    )
    assert failed.returncode != 0 and "response_format" in failed.stderr
