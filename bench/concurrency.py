#!/usr/bin/env python3
"""Concurrency benchmark client for OpenAI-compatible completion servers (ultd, llama.cpp's llama-server).

For each concurrency level N it sends exactly N simultaneous streaming `POST /v1/completions` requests
(greedy, end-of-sequence ignored) and prints one JSON line per level:

  {"label", "concurrency", "requests", "wall_s", "completion_tokens", "aggregate_tok_s", "ttft_p50_ms",
   "ttft_p99_ms", "errors", ...}

aggregate_tok_s is all completion tokens of the level divided by the wall time from the first send to the
last byte received. TTFT is from a request's own send to its first chunk with non-empty text. A request's
token count is the server's own (a usage object's `completion_tokens`, or llama.cpp's `tokens_predicted`)
when it reports one, otherwise the number of chunks with non-empty text. Every prompt starts with a tag
unique to (level, repetition, request), so no prefix cache can reuse another request's prompt.

Python standard library only; it talks only to the loopback URL it is given.
  python3 bench/concurrency.py --url http://127.0.0.1:8080 --model smollm2 --concurrency 1,4,16,32 \
      --max-tokens 128 --prompt-words 96 --label ult
"""

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse

PASSAGE = (
    "The river valley was quiet in the early morning, and the mist lay low over the fields while the farmers "
    "walked out to inspect the orchards. A small train crossed the old stone bridge, carrying timber and "
    "letters to the town on the far side of the hills. In the market square the bakers opened their shutters, "
    "the smell of bread drifted between the houses, and children ran past the fountain on their way to the "
    "school. The mayor had promised a new library, and the builders had already marked the ground with ropes "
    "and wooden stakes. Travellers who stopped at the inn told stories of the coast, of storms that lasted for "
    "a week, of ships that came back with strange fruit and stranger news. Every evening the bells of the "
    "church rang six times, and the shepherds brought their flocks down from the high pastures before dark."
)
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def prompt_text(tag: str, words: int) -> str:
    ws = PASSAGE.split()
    body = [ws[k % len(ws)] for k in range(words)]
    return f"Request {tag}: " + " ".join(body)


def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    x = (len(v) - 1) * p / 100.0
    lo = int(x)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def chunk_text(obj):
    """The text a streamed chunk carries: completions (`text`), chat (`delta.content`) or llama.cpp native."""
    choices = obj.get("choices")
    if isinstance(choices, list) and choices:
        c = choices[0] or {}
        t = c.get("text")
        if t is None and isinstance(c.get("delta"), dict):
            t = c["delta"].get("content")
        return t or ""
    t = obj.get("content")
    return t if isinstance(t, str) else ""


def reported_tokens(obj):
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return usage["completion_tokens"]
    for k in ("completion_tokens", "tokens_predicted"):
        if isinstance(obj.get(k), int):
            return obj[k]
    timings = obj.get("timings")
    if isinstance(timings, dict) and isinstance(timings.get("predicted_n"), int):
        return timings["predicted_n"]
    return None


class Request:
    def __init__(self, host, port, timeout, body):
        self.host, self.port, self.timeout, self.body = host, port, timeout, body
        self.t_send = None
        self.t_first = None
        self.t_last = None
        self.chunks = 0  # chunks with non-empty text
        self.reported = None  # the server's own completion-token count, if any
        self.error = None
        self.finish_reason = None

    def tokens(self):
        return self.reported if self.reported is not None else self.chunks

    def run(self, barrier):
        conn = None
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            conn.connect()
            if barrier is not None:
                barrier.wait()
            deadline = time.monotonic() + self.timeout
            self.t_send = time.perf_counter()
            conn.request(
                "POST",
                "/v1/completions",
                body=self.body,
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                self.error = f"HTTP {resp.status}: {resp.read(500).decode('utf-8', 'replace').strip()}"
                self.t_last = time.perf_counter()
                return
            done = False
            while not done:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"request exceeded {self.timeout} s")
                line = resp.readline()
                if not line:
                    break
                self.t_last = time.perf_counter()
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if isinstance(obj, dict) and "error" in obj:
                    self.error = f"stream error: {json.dumps(obj['error'])[:300]}"
                    break
                if chunk_text(obj):
                    self.chunks += 1
                    if self.t_first is None:
                        self.t_first = self.t_last
                n = reported_tokens(obj)
                if n is not None:
                    self.reported = n
                ch = obj.get("choices")
                if isinstance(ch, list) and ch and isinstance(ch[0], dict) and ch[0].get("finish_reason"):
                    self.finish_reason = ch[0]["finish_reason"]
                if obj.get("stop") is True:  # llama.cpp native final chunk
                    done = True
            if self.error is None and self.t_first is None:
                self.error = "no text received"
        except Exception as e:  # noqa: BLE001 - every failure is one counted error
            self.error = f"{type(e).__name__}: {e}"
            self.t_last = time.perf_counter()
        finally:
            if conn is not None:
                conn.close()


def run_level(args, host, port, level, rep):
    reqs = []
    for i in range(level):
        body = {
            "model": args.model,
            "prompt": prompt_text(f"{level}.{rep}.{i}", args.prompt_words),
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        reqs.append(Request(host, port, args.timeout, json.dumps(body).encode()))
    barrier = threading.Barrier(level) if level > 1 else None
    threads = [threading.Thread(target=r.run, args=(barrier,), daemon=True) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.timeout + 30)
    ok = [r for r in reqs if r.error is None]
    errors = [r for r in reqs if r.error is not None]
    sends = [r.t_send for r in reqs if r.t_send is not None]
    lasts = [r.t_last for r in reqs if r.t_last is not None]
    wall = (max(lasts) - min(sends)) if sends and lasts else 0.0
    tokens = sum(r.tokens() for r in ok)
    ttfts = [(r.t_first - r.t_send) * 1000.0 for r in ok if r.t_first is not None]
    per_req = [r.tokens() for r in ok]
    # Each request's decode rate after its first token (tokens after the first / time after the first).
    decode = [
        (r.tokens() - 1) / (r.t_last - r.t_first)
        for r in ok
        if r.t_first is not None and r.t_last > r.t_first and r.tokens() > 1
    ]
    out = {
        "label": args.label,
        "concurrency": level,
        "requests": level,
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "aggregate_tok_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_ms": round(percentile(ttfts, 50), 1) if ttfts else None,
        "ttft_p99_ms": round(percentile(ttfts, 99), 1) if ttfts else None,
        "errors": len(errors),
        "per_request_decode_tok_s_p50": round(percentile(decode, 50), 2) if decode else None,
        "min_tokens_per_request": min(per_req) if per_req else 0,
        # requests that stopped before max_tokens (a server ignoring `ignore_eos`, or a context limit)
        "short_requests": sum(1 for n in per_req if n < args.max_tokens),
        "token_count_source": (
            "server" if ok and all(r.reported is not None for r in ok) else "chunks" if ok else None
        ),
        "rep": rep,
    }
    if errors:
        out["first_error"] = errors[0].error[:300]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="http://127.0.0.1:PORT (loopback only)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,4,16,32", help="comma-separated levels")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=96)
    ap.add_argument("--label", default="server")
    ap.add_argument("--reps", type=int, default=1, help="repetitions per level; the best aggregate is kept")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    ap.add_argument("--no-warmup", action="store_true")
    args = ap.parse_args()

    u = urllib.parse.urlsplit(args.url)
    if u.scheme != "http" or u.hostname not in LOOPBACK or u.port is None:
        sys.exit(f"concurrency.py: --url must be http://<loopback>:PORT, got {args.url!r}")
    if u.path not in ("", "/"):
        sys.exit("concurrency.py: --url takes no path (requests go to /v1/completions)")
    host, port = u.hostname, u.port
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or any(n < 1 or n > 256 for n in levels):
        sys.exit("concurrency.py: levels must be between 1 and 256")
    if args.max_tokens < 1 or args.prompt_words < 1 or args.reps < 1:
        sys.exit("concurrency.py: --max-tokens, --prompt-words and --reps must be positive")

    if not args.no_warmup:
        w = argparse.Namespace(**vars(args))
        w.max_tokens = min(8, args.max_tokens)
        r = run_level(w, host, port, 1, "warmup")
        if r["errors"]:
            sys.exit(f"concurrency.py: warm-up failed: {r.get('first_error')}")
        print(f"[{args.label}] warm-up ok: {r['completion_tokens']} tokens in {r['wall_s']} s", file=sys.stderr)

    failed = False
    for level in levels:
        best = None
        for rep in range(args.reps):
            r = run_level(args, host, port, level, rep)
            print(f"[{args.label}] {json.dumps(r)}", file=sys.stderr)
            if best is None or r["aggregate_tok_s"] > best["aggregate_tok_s"]:
                best = r
        failed |= best["errors"] > 0
        print(json.dumps(best), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
