#!/usr/bin/env python3
"""Writes the seed corpus for ult's fuzz targets into fuzz/corpus/<target>/ (committed; rerun to regenerate).

gguf: three tiny but complete GGUF files that ult inspects successfully, so mutations start past the magic:
a llama model with a byte-level BPE (gpt2) vocabulary and merges plus a ChatML template, a llama model with
a SentencePiece (llama) vocabulary with byte fallback, and a gemma3 model. f32 tensors of 8 wide.
models_toml: the shipped models.toml and variants with routes, sizes and every daemon key.
request: generation requests in the byte layout of ultd::fuzzing::decode_request.
"""

import importlib.machinery
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))
synth = importlib.machinery.SourceFileLoader("synth", os.path.join(here, "..", "scripts", "synth-model")).load_module()
STR, ARR, U32, F32V, BOOL, I32 = synth.STR, synth.ARR, synth.U32, synth.F32V, synth.BOOL, synth.I32
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gpt2_vocab():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in cs]
    merges = ["Ġ t", "h e", "Ġt he", "l l", "ll o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return [
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.pre", STR, "smollm"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.merges", ARR, (STR, merges)),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.chat_template", STR, CHATML),
    ], len(tokens)


def spm_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["▁", "▁h", "he", "ll", "llo", "▁hello", "▁w", "or", "ld", "▁world", "ö", "🦀"]
    tokens += pieces
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return [
        ("tokenizer.ggml.model", STR, "llama"),
        ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.scores", ARR, (F32V, scores)),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.unknown_token_id", U32, 0),
        ("tokenizer.ggml.add_bos_token", BOOL, True),
    ], len(tokens)


def gguf(arch, vocab_kv, vocab):
    dim, heads, kv_heads, ffn, layers = 8, 2, 1, 16, 1
    hd = dim // heads
    kv = [
        ("general.architecture", STR, arch),
        ("general.name", STR, f"fuzz seed {arch}"),
        ("general.alignment", U32, 32),
        (f"{arch}.block_count", U32, layers),
        (f"{arch}.context_length", U32, 128),
        (f"{arch}.embedding_length", U32, dim),
        (f"{arch}.feed_forward_length", U32, ffn),
        (f"{arch}.attention.head_count", U32, heads),
        (f"{arch}.attention.head_count_kv", U32, kv_heads),
        (f"{arch}.rope.freq_base", F32V, 10000.0),
        (f"{arch}.attention.layer_norm_rms_epsilon", F32V, 1e-5),
    ]
    if arch == "gemma3":
        kv += [("gemma3.attention.key_length", U32, hd), ("gemma3.attention.value_length", U32, hd),
               ("gemma3.attention.sliding_window", U32, 16)]
    kv += vocab_kv
    tensors = [("token_embd.weight", (dim, vocab))]
    for i in range(layers):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (dim,)), (p + "attn_q.weight", (dim, dim)),
                    (p + "attn_k.weight", (dim, kv_heads * hd)), (p + "attn_v.weight", (dim, kv_heads * hd)),
                    (p + "attn_output.weight", (dim, dim)), (p + "ffn_norm.weight", (dim,)),
                    (p + "ffn_gate.weight", (dim, ffn)), (p + "ffn_up.weight", (dim, ffn)),
                    (p + "ffn_down.weight", (ffn, dim))]
        if arch == "gemma3":
            tensors += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,)),
                        (p + "post_attention_norm.weight", (dim,)), (p + "post_ffw_norm.weight", (dim,))]
    tensors += [("output_norm.weight", (dim,))]
    head = bytearray(b"GGUF") + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, t, v in kv:
        synth.put_string(head, k)
        head += struct.pack("<I", t)
        synth.put_value(head, t, v)
    offset, data = 0, bytearray()
    for name, dims in tensors:
        synth.put_string(head, name)
        head += struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", 0, offset)
        n = 4
        for d in dims:
            n *= d
        data += struct.pack("<f", 0.01) * (n // 4) + b"\0" * (-n % 32)
        offset += n + (-n % 32)
    head += b"\0" * (-len(head) % 32)
    return bytes(head + data)


def request(flags, max_tokens, temperature, top_p, penalty, top_k, strings):
    return struct.pack("<BIfffH", flags, max_tokens, temperature, top_p, penalty, top_k) + "\0".join(strings).encode()


def write(target, name, data):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def main():
    kv, n = gpt2_vocab()
    write("gguf", "llama-gpt2.gguf", gguf("llama", kv, n))
    kv, n = spm_vocab()
    write("gguf", "llama-spm.gguf", gguf("llama", kv, n))
    write("gguf", "gemma3-spm.gguf", gguf("gemma3", kv, n))

    with open(os.path.join(here, "..", "models.toml")) as f:
        write("models_toml", "shipped.toml", f.read())
    write("models_toml", "routes.toml", """[daemon]
listen = "127.0.0.1:0"
socket = "off"
http = "off"
memory_ceiling = "12GiB"
headroom = "10%"
state_file = "off"
[models.a]
path = "a.gguf"
kind = "chat"
context = 2048
aliases = ["alpha"]
keep_alive = "5m"
priority = 2.0
[models.b]
path = "b.gguf"
kind = "completion"
pinned = true
[routes.fast]
models = ["a", "b"]
strategy = "ordered"
""")
    write("models_toml", "bad.toml", "[daemon]\nlisten = 5\n[models.x]\npath = \"\"\nkind = \"chat\"\ncontext = -1\n")

    write("request", "prompt", request(16, 8, 0.0, 1.0, 1.0, 0, ["The capital of France is"]))
    write("request", "chat", request(1 | 2 | 4 | 16, 16, 0.7, 0.9, 1.0, 40, ["system", "Be brief.", "user", "What is the capital of France?", "\x01\n\n"]))
    write("request", "penalty", request(8, 0, 1.5, 0.0, 1.1, 0, ["wörld 🦀 <|im_start|>", "\x01stop"]))


if __name__ == "__main__":
    main()
