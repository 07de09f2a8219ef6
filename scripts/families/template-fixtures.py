#!/usr/bin/env python3
"""Renders the family chat templates in engine/tests/fixtures/templates/*.jinja (copied from llama.cpp
0.3.36's models/templates) with Python's jinja2 as Hugging Face transformers does (trim_blocks,
lstrip_blocks, tojson = json.dumps(ensure_ascii=False), raise_exception), for a plain chat, a chat with a tool
and one that breaks role alternation, into engine/tests/fixtures/templates/expected.json: the independent reference ult's minijinja
rendering is tested against. Maintainers only:
    ~/.cache/ult/families-venv/bin/pip install jinja2==3.1.6
    ~/.cache/ult/families-venv/bin/python scripts/families/template-fixtures.py
"""

import json
import os

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "engine", "tests", "fixtures", "templates")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Zürich"}}, "required": ["city"]},
        },
    }
]
CASES = {
    "chat": dict(messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}], tools=None),
    "tools": dict(messages=[{"role": "user", "content": "Weather in Zürich?"}], tools=TOOLS),
    # Two user turns in a row: templates that check alternation raise_exception.
    "bad": dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tools=None),
}


def raise_exception(msg):
    raise jinja2.exceptions.TemplateError(msg)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def main():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: ""
    out = {}
    for name in sorted(os.listdir(HERE)):
        if not name.endswith(".jinja"):
            continue
        t = env.from_string(open(os.path.join(HERE, name)).read())
        for case, args in CASES.items():
            ctx = dict(messages=args["messages"], add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
            if args["tools"] is not None:
                ctx["tools"] = args["tools"]
            try:
                out[f"{name}/{case}"] = {"ok": t.render(**ctx)}
            except jinja2.exceptions.TemplateError as e:
                out[f"{name}/{case}"] = {"error": str(e)}
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
