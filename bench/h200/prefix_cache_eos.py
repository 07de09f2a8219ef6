#!/usr/bin/env python3
"""bench/prefix_cache.py, unchanged, with `"ignore_eos": true` added to each request it sends.

SmolLM2-135M-Instruct answers most of prefix_cache.py's prompts with an end-of-sequence token first, so its
stream carries no text, its time to first token is null and its summary fails (seen with llama-server and
ultd alike, 2026-12-01). Ignoring end-of-sequence, as bench/concurrency.py does, makes every request stream
text; nothing else in the client changes. Same arguments as bench/prefix_cache.py.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import prefix_cache  # noqa: E402  (bench/prefix_cache.py)

_dumps = json.dumps


class _Json:
    loads = staticmethod(json.loads)

    @staticmethod
    def dumps(obj, *args, **kwargs):
        if isinstance(obj, dict) and "prompt" in obj:
            obj = {**obj, "ignore_eos": True}
        return _dumps(obj, *args, **kwargs)


prefix_cache.json = _Json
if __name__ == "__main__":
    prefix_cache.main()
