"""OpenAI compatibility through Ray Serve's HTTP proxy, with the official openai client: chat (plain and
streamed), completions, embeddings, the model list, and ultd's own errors passed through unchanged."""

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.url("ult") + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_plain_and_streamed(client):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].message.content
    assert 0 < plain.usage.completion_tokens <= 8
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="chat", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == plain.choices[0].message.content  # greedy: the same tokens, and the alias works


def test_completion_and_embeddings(client):
    text = client.completions.create(model="gemma3", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert text.choices[0].text
    emb = client.embeddings.create(model="minilm", input=["A cat sits on the mat", "Stock markets fell"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384


def test_model_list_and_errors_pass_through(stack, client):
    names = {m.id for m in client.models.list()}
    assert {"smollm2", "gemma3", "minilm"} <= names
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert "no-such-model" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=1, logit_bias={"1": 5})
    assert "logit_bias" in str(e.value)
    r = httpx.post(stack.url("ult") + "/v1/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
