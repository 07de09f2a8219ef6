#!/usr/bin/env python3
"""Writes tokenizer fixtures from independent implementations, for ult's tokenizer tests.

- gpt2 vocabulary (SmolLM2): Hugging Face transformers' own GGUF tokenizer converter (tokenizers' BPE).
- llama/SentencePiece vocabulary (Gemma 3): Google's sentencepiece library, fed a ModelProto rebuilt from
  the GGUF vocabulary (pieces, scores, types; byte fallback; no dummy prefix). transformers 4.57's GGUF
  converter is not used for Gemma: it builds a Unigram model that mis-tokenizes ("Hello world" ->
  Hello ▁w or ld).
- BERT WordPiece (MiniLM): the tokenizers library on the model's own tokenizer.json.

Special tokens written in the text (control and user-defined pieces) are matched whole, as ult does.
Run through scripts/tokenizer-fixtures.sh, which makes the virtual environment.
"""
import json
import pathlib
import sys

import transformers.modeling_gguf_pytorch_utils as gguf_utils

# transformers checks for torch before reading any GGUF, but torch is only needed for the weights.
gguf_utils.is_torch_available = lambda: True

import gguf  # noqa: E402
import sentencepiece as spm  # noqa: E402
from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
out_dir = root / "engine/tests/fixtures/tokenizer"
out_dir.mkdir(parents=True, exist_ok=True)

COMMON = [
    "Hello world",
    "What is the capital of France?",
    "In 2024, 1234567 people paid $3.14 each (≈ 3,876,543.21€).",
    "\tindented\n\n\n    four spaces  two\t\ttabs \n trailing  ",
    "Ünïcödé naïve café — “quotes” ‘single’ …",
    "你好，世界！日本語のテキスト。한국어 텍스트",
    "I ❤️ Rust 🦀🚀👩‍👩‍👧‍👦 ok",
    'fn main() {\n    println!("{}", x?.len());\n}\n// comment <tag> &amp;',
    "https://example.com/path?q=1&x=y#frag mail@ex.org",
    "The quick brown fox jumps over the lazy dog. THE END!!! ...",
    "\U0001F9FF ǅ ẞ ﬁ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "a" * 80,
    "I'm sure you'll see they've done it, haven't they? It's John's.",
    "",
    "   ",
    "\n\n\n\n\n",
    "Привет мир مرحبا بالعالم שלום",
]


def write(name, cases):
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {path}")


# --- SmolLM2: gpt2 vocabulary through transformers ---
smol = AutoTokenizer.from_pretrained(root / "models/smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
smol_texts = COMMON + [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|endoftext|>",
]
write("smollm2", [{"text": t, "ids": smol.encode(t, add_special_tokens=False)} for t in smol_texts])

# --- Gemma 3: SentencePiece through sentencepiece itself ---
reader = gguf.GGUFReader(root / "models/gemma3/gemma-3-270m-q4_k_m.gguf")


def field(name):
    f = reader.fields[name]
    return f


def strings(name):
    f = field(name)
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def numbers(name):
    f = field(name)
    return [f.parts[i][0].item() for i in f.data]


def scalar(name, default=None):
    if name not in reader.fields:
        return default
    f = field(name)
    return f.parts[f.data[0]][0].item()


tokens = strings("tokenizer.ggml.tokens")
scores = numbers("tokenizer.ggml.scores")
types = numbers("tokenizer.ggml.token_type")
proto = sp_pb2.ModelProto()
proto.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
proto.trainer_spec.vocab_size = len(tokens)
proto.trainer_spec.byte_fallback = True
proto.trainer_spec.unk_id = scalar("tokenizer.ggml.unknown_token_id", 3)
proto.trainer_spec.bos_id = scalar("tokenizer.ggml.bos_token_id", 2)
proto.trainer_spec.eos_id = scalar("tokenizer.ggml.eos_token_id", 1)
proto.trainer_spec.pad_id = scalar("tokenizer.ggml.padding_token_id", 0)
proto.normalizer_spec.name = "identity"
proto.normalizer_spec.add_dummy_prefix = bool(scalar("tokenizer.ggml.add_space_prefix", False))
proto.normalizer_spec.remove_extra_whitespaces = False
proto.normalizer_spec.escape_whitespaces = True
kinds = {1: sp_pb2.ModelProto.SentencePiece.NORMAL, 2: sp_pb2.ModelProto.SentencePiece.UNKNOWN,
         3: sp_pb2.ModelProto.SentencePiece.USER_DEFINED,  # control tokens in text are parsed as special
         4: sp_pb2.ModelProto.SentencePiece.USER_DEFINED, 5: sp_pb2.ModelProto.SentencePiece.UNUSED,
         6: sp_pb2.ModelProto.SentencePiece.BYTE}
special_ids = {proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id}
for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
    p = proto.pieces.add()
    # llama.cpp stores user-defined pieces with real spaces; SentencePiece matches them after escaping.
    p.piece = piece.replace(" ", "▁") if kind == 4 else piece
    p.score = score
    p.type = sp_pb2.ModelProto.SentencePiece.CONTROL if i in special_ids and kind == 3 else kinds.get(kind, 1)
    if i == proto.trainer_spec.unk_id:
        p.type = sp_pb2.ModelProto.SentencePiece.UNKNOWN
sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def gemma_encode(text):
    # BOS/EOS/PAD/UNK stay CONTROL in the proto (SentencePiece requires it); split them out by hand.
    specials = {tokens[i]: i for i in special_ids}
    ids, rest = [], text
    while rest:
        hits = [(rest.find(s), s) for s in specials if rest.find(s) >= 0]
        if not hits:
            ids += sp.encode(rest)
            break
        at, s = min(hits)
        if at:
            ids += sp.encode(rest[:at])
        ids.append(specials[s])
        rest = rest[at + len(s):]
    return ids


gemma_texts = COMMON + [
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>The capital of France is<eos>",
]
write("gemma3", [{"text": t, "ids": gemma_encode(t)} for t in gemma_texts])

# --- MiniLM: BERT WordPiece through tokenizers ---
bert = Tokenizer.from_file(str(root / "models/minilm/tokenizer.json"))
bert.no_padding()
bert.no_truncation()
bert_texts = COMMON + ["A cat sits on the mat", "[CLS] already special [SEP]", "Ünïcödé ÀÉÎÕÜ résumé"]
write("minilm", [{"text": t, "ids": bert.encode(t).ids} for t in bert_texts])
