#!/usr/bin/env python3
"""Prefix-cache benchmark client for OpenAI-compatible completion servers (ultd, llama.cpp's llama-server).

Each repetition builds a shared prefix of about --prefix-words words (unique to the repetition, so no
earlier repetition's cache helps), then sends two streaming `POST /v1/completions` requests one after the
other: the prefix plus question A (the cold request), then the prefix plus question B (the cached one).
Time to first token is from a request's send to its first chunk with non-empty text. Prints one JSON line
per repetition and a summary line with the medians:

  {"label", "rep", "first_ttft_ms", "second_ttft_ms", "speedup", "prompt_tokens", "cached_tokens"}

Greedy, 4 tokens per request, end-of-sequence ignored (a small model may otherwise answer with it first and
stream no text). Python standard library only; it talks only to the loopback URL it is given.
  python3 bench/prefix_cache.py --url http://127.0.0.1:8080 --model smollm2 --prefix-words 1500 --label ult
"""

import argparse
import http.client
import json
import statistics
import sys
import time
import urllib.parse

WORDS = (
    "the harbour master kept a ledger of every ship that entered the bay with its cargo its crew and the "
    "weather it had met and in winter when the storms came he wrote by lamplight while the waves broke on "
    "the breakwater and the gulls sheltered under the eaves of the customs house"
).split()
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def prefix(rep: int, words: int) -> str:
    body = " ".join(WORDS[(k * 7 + rep) % len(WORDS)] for k in range(words))
    return f"Ledger {rep}. {body}\n"


def ttft(url, model, prompt, max_tokens):
    """Streams one completion; returns (ms to the first text, usage dict or None)."""
    u = urllib.parse.urlparse(url)
    if u.hostname not in LOOPBACK:
        sys.exit(f"refusing non-loopback URL {url}")
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": True,
                       "ignore_eos": True})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        sys.exit(f"HTTP {r.status}: {r.read()[:300]!r}")
    first, usage = None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        d = json.loads(line[5:])
        if d.get("usage"):
            usage = d["usage"]
        for c in d.get("choices", []):
            if c.get("text") and first is None:
                first = (time.perf_counter() - start) * 1000.0
    conn.close()
    return first, usage


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--prefix-words", type=int, default=1500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=4)
    a = ap.parse_args()
    firsts, seconds = [], []
    for rep in range(a.reps):
        p = prefix(rep, a.prefix_words)
        t1, _ = ttft(a.url, a.model, p + "Question: which ship came first?\nAnswer:", a.max_tokens)
        t2, usage = ttft(a.url, a.model, p + "Question: what was the weather like?\nAnswer:", a.max_tokens)
        usage = usage or {}
        details = usage.get("prompt_tokens_details") or {}
        row = {"label": a.label, "rep": rep, "first_ttft_ms": t1, "second_ttft_ms": t2,
               "speedup": t1 / t2 if t1 and t2 else None, "prompt_tokens": usage.get("prompt_tokens"),
               "cached_tokens": details.get("cached_tokens")}
        print(json.dumps(row), flush=True)
        firsts.append(t1)
        seconds.append(t2)
    f, s = statistics.median(firsts), statistics.median(seconds)
    print(json.dumps({"label": a.label, "summary": True, "first_ttft_ms": f, "second_ttft_ms": s,
                      "speedup": f / s}), flush=True)


if __name__ == "__main__":
    main()
