#!/usr/bin/env python3
"""Records Apple's mlx-lm on the model folders of scripts/mlx/make-checkpoints.sh, for ult's tests.

    ~/.cache/ult/mlx-venv/bin/python scripts/mlx/make-fixtures.py models/mlx engine/tests/fixtures

- engine/tests/fixtures/mlx/<folder>.json: mlx-lm's logits at every position of the teacher-forced prompt
  (scripts/families/prompt.txt, tokenized by the folder's own tokenizer through transformers), stored as
  the family fixtures store llama.cpp's: per position the argmax, the top 8 (id, logit) and the L2 norm of
  all other logits; then 12 greedy tokens, with mlx-lm's top-two margin at each greedy step. mlx-lm runs each model with its float parameters cast to f32
  (`set_dtype`: the bf16 weights, scales and biases widen exactly), so the fixtures hold the folders' own
  weights in f32 arithmetic, not bf16 activation rounding.
- engine/tests/fixtures/tokenizer/hf-<family>.json: the tokenizers library's ids for the tokenizer
  fixtures' texts with each folder's tokenizer.json (no special tokens added).
"""
import json
import pathlib
import sys

import mlx.core as mx
import mlx_lm
from tokenizers import Tokenizer

models = pathlib.Path(sys.argv[1])
fixtures = pathlib.Path(sys.argv[2])
root = pathlib.Path(__file__).resolve().parents[2]
prompt = (root / "scripts/families/prompt.txt").read_text().strip()
TOP, GREEDY = 8, 12

(fixtures / "mlx").mkdir(parents=True, exist_ok=True)
for d in sorted(p for p in models.iterdir() if (p / "config.json").exists()):
    model, tok = mlx_lm.load(str(d))
    model.set_dtype(mx.float32)
    tokens = tok.encode(prompt)
    logits = model(mx.array([tokens]))[0].astype(mx.float32)
    positions = []
    for row in logits.tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])[:TOP]
        top = set(order)
        rest = sum(x * x for i, x in enumerate(row) if i not in top) ** 0.5
        positions.append({"argmax": order[0], "top": [[i, row[i]] for i in order], "rest_l2": rest})
    seq = list(tokens)
    greedy, margins = [], []
    for _ in range(GREEDY):
        last = model(mx.array([seq]))[0, -1].astype(mx.float32).tolist()
        order = sorted(range(len(last)), key=lambda i: -last[i])
        greedy.append(order[0])
        margins.append(last[order[0]] - last[order[1]])
        seq.append(order[0])
    out = {"prompt": prompt, "tokens": tokens, "positions": positions, "greedy": greedy,
           "greedy_margins": margins}
    (fixtures / "mlx" / f"{d.name}.json").write_text(
        "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in out.items() if k != "positions")
        + ',"positions":[\n' + ",\n".join(json.dumps(p, separators=(",", ":")) for p in positions) + "]}\n")
    print(d.name, "argmax", [p["argmax"] for p in positions][:6], "greedy", greedy)

texts = [c["text"] for c in json.loads((fixtures / "tokenizer/smollm2.json").read_text())]
for family in ["llama", "qwen3", "qwen3moe"]:
    t = Tokenizer.from_file(str(models / f"hf-{family}" / "tokenizer.json"))
    cases = [{"text": x, "ids": t.encode(x, add_special_tokens=False).ids} for x in texts]
    (fixtures / "tokenizer" / f"hf-{family}.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")
    print("tokenizer", family, len(cases), "cases")
