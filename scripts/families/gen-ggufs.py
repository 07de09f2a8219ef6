#!/usr/bin/env python3
"""Writes the tiny random-weight GGUFs of every model family ult runs, byte for byte reproducibly.

    python gen-ggufs.py --tokenizer-from models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out models/families

One file per (model, type): the real tensor names and metadata keys of each architecture (as llama.cpp's
loader reads them), a few layers of small widths, and SmolLM2's tokenizer (49,152 tokens) with its chat
template copied in, so text prompts tokenize as they do for SmolLM2. Weights are seeded per tensor
(sha256 of "model/tensor"), drawn uniform with numpy's PCG64 and written with a hand-written GGUF writer,
so the bytes depend only on this script and numpy (scripts/families/ggufs.sha256 pins them).

Types: F32 (every tensor), F16 and Q8_0 (every matrix converted from the same F32 weights; norms, biases,
rope factors and MoE routers stay F32, as llama.cpp's converter and quantizer leave them) and Q4_K (every
matrix whose rows are a multiple of 256 holds random Q4_K blocks, not a quantization of the F32 weights;
any other matrix is Q8_0, as in a real Q4_K_M file). Only the weights differ between the types.
"""

import argparse
import hashlib
import os
import struct
import sys

import numpy as np

ALIGN = 32
# ggml tensor types and their (block elements, block bytes).
F32, F16, Q8_0, Q4_K = 0, 1, 8, 12
BLOCK = {F32: (1, 4), F16: (1, 2), Q8_0: (32, 34), Q4_K: (256, 144)}
FILE_TYPE = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K": 15}
# GGUF metadata value types.
U8, I8, U16, I16, U32, I32, F32V, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALARS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32V: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
VOCAB = 49152
ALL_TYPES = ["F32", "F16", "Q8_0", "Q4_K"]


class Reader:
    """Just enough of a GGUF reader to copy the tokenizer's metadata."""

    def __init__(self, path):
        self.f = open(path, "rb")
        if self.f.read(4) != b"GGUF":
            sys.exit(f"{path}: not a GGUF file")
        (self.version,) = self.u("<I")
        (self.n_tensors,) = self.u("<Q")
        (n_kv,) = self.u("<Q")
        self.kv = {}
        for _ in range(n_kv):
            key = self.string()
            (t,) = self.u("<I")
            self.kv[key] = (t, self.value(t))

    def u(self, fmt):
        return struct.unpack(fmt, self.f.read(struct.calcsize(fmt)))

    def string(self):
        (n,) = self.u("<Q")
        return self.f.read(n).decode("utf-8")

    def value(self, t):
        if t == STR:
            return self.string()
        if t == ARR:
            (et,) = self.u("<I")
            (n,) = self.u("<Q")
            return (et, [self.value(et) for _ in range(n)])
        return self.u(SCALARS[t])[0]


def put_string(out, s):
    b = s.encode("utf-8")
    out += struct.pack("<Q", len(b)) + b


def put_value(out, t, v):
    if t == STR:
        put_string(out, v)
    elif t == ARR:
        et, items = v
        out += struct.pack("<IQ", et, len(items))
        if et in SCALARS:
            out += struct.pack("<" + SCALARS[et][1] * len(items), *items)
        else:
            for item in items:
                put_value(out, et, item)
    else:
        out += struct.pack(SCALARS[t], v)


def rng_for(model, tensor):
    seed = int.from_bytes(hashlib.sha256(f"{model}/{tensor}".encode()).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(seed))


def uniform(rng, n, std):
    """n values uniform in [-a, a) with standard deviation std."""
    a = np.float32(std * np.sqrt(3.0))
    return (rng.random(n, dtype=np.float32) * np.float32(2.0) - np.float32(1.0)) * a


def quantize_q8_0(x):
    """ggml's reference Q8_0: per 32 values an f16 scale amax/127 and int8 round(x / scale)."""
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=1)
    d = amax / np.float32(127.0)
    inv = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, np.float32(1.0)), np.float32(0.0)).astype(np.float32)
    v = b * inv[:, None]
    q = np.trunc(v + np.copysign(np.float32(0.5), v)).astype(np.int8)  # roundf: half away from zero
    out = np.empty((b.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def random_q4_k(rng, n, std):
    """Random Q4_K blocks (f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles)
    whose values have about the standard deviation std (253·d for dmin = 7.5·d, see the report)."""
    blocks = n // 256
    raw = rng.integers(0, 256, size=(blocks, 144), dtype=np.uint8)
    d = np.float16(std / 253.0)
    dmin = np.float16(7.5 * std / 253.0)
    raw[:, 0:2] = np.frombuffer(np.array([d], dtype=np.float16).tobytes(), dtype=np.uint8)
    raw[:, 2:4] = np.frombuffer(np.array([dmin], dtype=np.float16).tobytes(), dtype=np.uint8)
    return raw.tobytes()


def llama3_rope_factors(head_dim, base, factor=8.0, low=1.0, high=4.0, orig=8192):
    """The rope_freqs.weight that llama.cpp's converter writes for Llama 3.1's rope scaling."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen, high_wavelen = orig / low, orig / high
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# Every model: architecture, shape and extras. Counts are (layers, hidden, heads, kv heads, head dim, ffn).
MODELS = {
    # Llama 3.1-style: rope base 500000 and the rope_freqs.weight of its long-context scaling.
    "llama3": dict(arch="llama", shape=(2, 256, 4, 2, 64, 512), rope_base=500000.0, rope_freqs=True, eps=1e-5, types=ALL_TYPES),
    # Mistral-style (Nemo): llama architecture, head size 128 set explicitly (not hidden / heads), 4:1 GQA.
    "mistral": dict(arch="llama", shape=(2, 256, 4, 1, 128, 512), rope_base=1000000.0, eps=1e-5, types=ALL_TYPES),
    "llama-linear": dict(arch="llama", shape=(2, 256, 4, 2, 64, 512), rope_base=10000.0, scaling=("linear", 4.0, None), eps=1e-5, types=["F32"]),
    "llama-yarn": dict(arch="llama", shape=(2, 256, 4, 2, 64, 512), rope_base=10000.0, scaling=("yarn", 4.0, 1024), eps=1e-5, types=["F32"]),
    "qwen2": dict(arch="qwen2", shape=(2, 256, 4, 2, 64, 512), rope_base=1000000.0, qkv_bias=True, eps=1e-6, types=ALL_TYPES),
    # Qwen3: per-head q/k RMSNorm, head size 128 with hidden 256 and 4 heads.
    "qwen3": dict(arch="qwen3", shape=(2, 256, 4, 2, 128, 512), rope_base=1000000.0, qk_norm=True, eps=1e-6, types=ALL_TYPES),
    # Qwen3-MoE: 8 routed experts of width 256, 2 per token, normalised gates.
    "qwen3moe": dict(arch="qwen3moe", shape=(2, 256, 4, 2, 64, 512), rope_base=1000000.0, qk_norm=True, moe=(8, 2, 256), eps=1e-6, types=ALL_TYPES),
    # Phi-3: fused attn_qkv and fused gate-up ffn_up.
    "phi3": dict(arch="phi3", shape=(2, 256, 4, 2, 64, 512), rope_base=10000.0, fused=True, eps=1e-5, types=ALL_TYPES),
    # Gemma 3: 6 layers (5 local, 1 global), a 12-token window, and a local rope base read from metadata.
    "gemma3": dict(arch="gemma3", shape=(6, 256, 4, 1, 64, 512), rope_base=1000000.0, rope_base_swa=20000.0, window=12, eps=1e-6, types=ALL_TYPES),
    # DeepSeek-V3-style deepseek2 (as llama.cpp's converter writes it since MLA: attn_k_b/attn_v_b, one
    # KV head of kv_lora + rope): 3 layers, the first dense; Q through a q_lora_rank; routed experts with
    # sigmoid gates, a selection bias (exp_probs_b), group-limited routing, normalised and scaled gates,
    # and a shared expert. The shape's head size (4th and 5th) is unused: see "mla".
    "deepseek2": dict(
        arch="deepseek2", shape=(3, 256, 4, 1, 0, 512), rope_base=10000.0, eps=1e-6, types=["F32", "F16"],
        # (q_lora_rank, kv_lora_rank, qk_nope, qk_rope, v_head_dim)
        mla=(128, 64, 32, 32, 48),
        # (experts, used, expert ffn, shared experts, dense leading layers, gating (2 sigmoid), groups,
        #  groups used, weights norm, weights scale, selection bias)
        ds_moe=(8, 2, 128, 1, 1, 2, 4, 2, True, 2.5, True),
    ),
    # DeepSeek-V2-Lite-style: no q_lora (attn_q), softmax gates unnormalised, no groups, no bias, two shared
    # experts, and YaRN rope scaling with its yarn_log_multiplier (DeepSeek's mscale_all_dim · 0.1).
    "deepseek2-lite": dict(
        arch="deepseek2", shape=(3, 256, 4, 1, 0, 512), rope_base=10000.0, eps=1e-6, types=ALL_TYPES,
        mla=(0, 64, 32, 32, 32),
        ds_moe=(8, 2, 64, 2, 1, 1, 0, 0, False, 1.0, False),
        scaling=("yarn", 4.0, 1024), yarn_log_mul=0.0707,
    ),
}


def tensors_of(name, m):
    """(tensor name, ggml dims innermost first, role) in file order. Roles: matrix, embed, norm, bias,
    router, rope."""
    layers, dim, heads, kv, hd, ffn = m["shape"]
    arch = m["arch"]
    out = [("token_embd.weight", (dim, VOCAB), "embed")]
    for i in range(layers):
        p = f"blk.{i}."
        out.append((p + "attn_norm.weight", (dim,), "norm"))
        if "mla" in m:
            out += deepseek2_layer(p, i, m)
            continue
        if m.get("fused"):
            out.append((p + "attn_qkv.weight", (dim, heads * hd + 2 * kv * hd), "matrix"))
        else:
            out += [
                (p + "attn_q.weight", (dim, heads * hd), "matrix"),
                (p + "attn_k.weight", (dim, kv * hd), "matrix"),
                (p + "attn_v.weight", (dim, kv * hd), "matrix"),
            ]
        if m.get("qkv_bias"):
            out += [
                (p + "attn_q.bias", (heads * hd,), "bias"),
                (p + "attn_k.bias", (kv * hd,), "bias"),
                (p + "attn_v.bias", (kv * hd,), "bias"),
            ]
        if m.get("qk_norm") or arch == "gemma3":
            out += [(p + "attn_q_norm.weight", (hd,), "norm"), (p + "attn_k_norm.weight", (hd,), "norm")]
        out.append((p + "attn_output.weight", (heads * hd, dim), "matrix"))
        if arch == "gemma3":
            out.append((p + "post_attention_norm.weight", (dim,), "norm"))
        out.append((p + "ffn_norm.weight", (dim,), "norm"))
        if m.get("moe"):
            n_exp, _, ff_exp = m["moe"]
            out += [
                (p + "ffn_gate_inp.weight", (dim, n_exp), "router"),
                (p + "ffn_gate_exps.weight", (dim, ff_exp, n_exp), "matrix"),
                (p + "ffn_up_exps.weight", (dim, ff_exp, n_exp), "matrix"),
                (p + "ffn_down_exps.weight", (ff_exp, dim, n_exp), "matrix"),
            ]
        elif m.get("fused"):
            out += [(p + "ffn_up.weight", (dim, 2 * ffn), "matrix"), (p + "ffn_down.weight", (ffn, dim), "matrix")]
        else:
            out += [
                (p + "ffn_gate.weight", (dim, ffn), "matrix"),
                (p + "ffn_up.weight", (dim, ffn), "matrix"),
                (p + "ffn_down.weight", (ffn, dim), "matrix"),
            ]
        if arch == "gemma3":
            out.append((p + "post_ffw_norm.weight", (dim,), "norm"))
    out.append(("output_norm.weight", (dim,), "norm"))
    if m.get("rope_freqs"):
        out.append(("rope_freqs.weight", (hd // 2,), "rope"))
    return out


def deepseek2_layer(p, i, m):
    """One deepseek2 layer after its attn_norm, in llama.cpp's tensor names and ggml dims."""
    _, dim, heads, _, _, ffn = m["shape"]
    q_lora, kv_lora, nope, rope, v_dim = m["mla"]
    n_exp, _, ff_exp, n_shared, dense, _, _, _, _, _, bias = m["ds_moe"]
    out = []
    if q_lora:
        out += [
            (p + "attn_q_a_norm.weight", (q_lora,), "norm"),
            (p + "attn_q_a.weight", (dim, q_lora), "matrix"),
            (p + "attn_q_b.weight", (q_lora, heads * (nope + rope)), "matrix"),
        ]
    else:
        out.append((p + "attn_q.weight", (dim, heads * (nope + rope)), "matrix"))
    out += [
        (p + "attn_kv_a_norm.weight", (kv_lora,), "norm"),
        (p + "attn_kv_a_mqa.weight", (dim, kv_lora + rope), "matrix"),
        (p + "attn_k_b.weight", (nope, kv_lora, heads), "matrix"),
        (p + "attn_v_b.weight", (kv_lora, v_dim, heads), "matrix"),
        (p + "attn_output.weight", (heads * v_dim, dim), "matrix"),
        (p + "ffn_norm.weight", (dim,), "norm"),
    ]
    if i < dense:
        return out + [
            (p + "ffn_gate.weight", (dim, ffn), "matrix"),
            (p + "ffn_up.weight", (dim, ffn), "matrix"),
            (p + "ffn_down.weight", (ffn, dim), "matrix"),
        ]
    out.append((p + "ffn_gate_inp.weight", (dim, n_exp), "router"))
    if bias:
        out.append((p + "exp_probs_b.bias", (n_exp,), "bias"))
    return out + [
        (p + "ffn_gate_exps.weight", (dim, ff_exp, n_exp), "matrix"),
        (p + "ffn_up_exps.weight", (dim, ff_exp, n_exp), "matrix"),
        (p + "ffn_down_exps.weight", (ff_exp, dim, n_exp), "matrix"),
        (p + "ffn_gate_shexp.weight", (dim, ff_exp * n_shared), "matrix"),
        (p + "ffn_up_shexp.weight", (dim, ff_exp * n_shared), "matrix"),
        (p + "ffn_down_shexp.weight", (ff_exp * n_shared, dim), "matrix"),
    ]


def metadata(name, m, ftype, tok):
    layers, dim, heads, kv, hd, ffn = m["shape"]
    a = m["arch"]
    kv_list = [
        ("general.architecture", STR, a),
        # Not the family's name: llama.cpp sets token attributes by general.name ("phi3" changes them).
        ("general.name", STR, "ult random-weight fixture"),
        ("general.file_type", U32, FILE_TYPE[ftype]),
        ("general.alignment", U32, ALIGN),
        (f"{a}.block_count", U32, layers),
        (f"{a}.context_length", U32, 4096),
        (f"{a}.embedding_length", U32, dim),
        (f"{a}.feed_forward_length", U32, ffn),
        (f"{a}.attention.head_count", U32, heads),
        (f"{a}.attention.head_count_kv", U32, kv),
        (f"{a}.attention.key_length", U32, hd),
        (f"{a}.attention.value_length", U32, hd),
        (f"{a}.rope.dimension_count", U32, hd),
        (f"{a}.rope.freq_base", F32V, m["rope_base"]),
        (f"{a}.attention.layer_norm_rms_epsilon", F32V, m["eps"]),
        (f"{a}.vocab_size", U32, VOCAB),
    ]
    if "mla" in m:
        q_lora, kv_lora, nope, rope, v_dim = m["mla"]
        n_exp, used, ff_exp, n_shared, dense, gating, groups, groups_used, norm, scale, _ = m["ds_moe"]
        # The converter's MLA layout: one KV head holding the latent and the rope key.
        replace = {
            f"{a}.attention.key_length": kv_lora + rope,
            f"{a}.attention.value_length": kv_lora,
            f"{a}.rope.dimension_count": rope,
        }
        kv_list = [(k, t, replace.get(k, v)) for k, t, v in kv_list]
        kv_list += [
            (f"{a}.attention.key_length_mla", U32, nope + rope),
            (f"{a}.attention.value_length_mla", U32, v_dim),
            (f"{a}.attention.q_lora_rank", U32, q_lora),
            (f"{a}.attention.kv_lora_rank", U32, kv_lora),
            (f"{a}.leading_dense_block_count", U32, dense),
            (f"{a}.expert_count", U32, n_exp),
            (f"{a}.expert_used_count", U32, used),
            (f"{a}.expert_shared_count", U32, n_shared),
            (f"{a}.expert_feed_forward_length", U32, ff_exp),
            (f"{a}.expert_weights_scale", F32V, scale),
            (f"{a}.expert_weights_norm", BOOL, norm),
            (f"{a}.expert_gating_func", U32, gating),
        ]
        if groups:
            kv_list += [(f"{a}.expert_group_count", U32, groups), (f"{a}.expert_group_used_count", U32, groups_used)]
        if "yarn_log_mul" in m:
            kv_list.append((f"{a}.rope.scaling.yarn_log_multiplier", F32V, m["yarn_log_mul"]))
    if "scaling" in m:
        kind, factor, orig = m["scaling"]
        kv_list += [(f"{a}.rope.scaling.type", STR, kind), (f"{a}.rope.scaling.factor", F32V, factor)]
        if orig:
            kv_list.append((f"{a}.rope.scaling.original_context_length", U32, orig))
    if m.get("moe"):
        n_exp, used, ff_exp = m["moe"]
        kv_list += [
            (f"{a}.expert_count", U32, n_exp),
            (f"{a}.expert_used_count", U32, used),
            (f"{a}.expert_feed_forward_length", U32, ff_exp),
        ]
    if a == "gemma3":
        kv_list += [
            ("gemma3.attention.sliding_window", U32, m["window"]),
            ("gemma3.rope.freq_base_swa", F32V, m["rope_base_swa"]),
        ]
    kv_list += [(k, t, v) for k, (t, v) in tok.kv.items() if k.startswith("tokenizer.")]
    return kv_list


def tensor_bytes(name, tname, dims, role, m, ftype):
    """(ggml type, bytes) of one tensor in a file of type ftype."""
    n = int(np.prod(dims))
    rng = rng_for(name, tname)
    fan_in = dims[0]
    if role == "norm":
        return F32, (np.float32(1.0) + uniform(rng, n, 0.2)).astype("<f4").tobytes()
    if role == "bias":
        return F32, uniform(rng, n, 0.5).astype("<f4").tobytes()
    if role == "rope":
        return F32, llama3_rope_factors(m["shape"][4], m["rope_base"]).astype("<f4").tobytes()
    if role == "router":
        return F32, uniform(rng, n, 4.0 / np.sqrt(fan_in)).astype("<f4").tobytes()
    std = 0.25 if role == "embed" else 1.0 / np.sqrt(fan_in)
    if ftype == "Q4_K" and fan_in % 256 == 0:
        return Q4_K, random_q4_k(rng, n, std)
    w = uniform(rng, n, std)
    if ftype == "F32":
        return F32, w.astype("<f4").tobytes()
    if ftype == "F16":
        return F16, w.astype("<f2").tobytes()
    return Q8_0, quantize_q8_0(w)


def write(path, name, m, ftype, tok):
    kv_list = metadata(name, m, ftype, tok)
    tensors = []
    for tname, dims, role in tensors_of(name, m):
        t, data = tensor_bytes(name, tname, dims, role, m, ftype)
        blk, size = BLOCK[t]
        assert len(data) == int(np.prod(dims)) // blk * size, tname
        tensors.append((tname, dims, t, data))
    head = bytearray(b"GGUF")
    head += struct.pack("<IQQ", 3, len(tensors), len(kv_list))
    for k, t, v in kv_list:
        put_string(head, k)
        head += struct.pack("<I", t)
        put_value(head, t, v)
    offset = 0
    for tname, dims, t, data in tensors:
        put_string(head, tname)
        head += struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", t, offset)
        offset += -(-len(data) // ALIGN) * ALIGN
    head += b"\0" * (-len(head) % ALIGN)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(head)
        for _, _, _, data in tensors:
            f.write(data)
            f.write(b"\0" * (-len(data) % ALIGN))
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", help="write only files whose name starts with this")
    args = ap.parse_args()
    tok = Reader(args.tokenizer_from)
    if len(tok.kv["tokenizer.ggml.tokens"][1][1]) != VOCAB:
        sys.exit("the tokenizer must have 49,152 tokens (SmolLM2's)")
    os.makedirs(args.out, exist_ok=True)
    for name, m in MODELS.items():
        for ftype in m["types"]:
            fname = f"{name}.{ftype}.gguf"
            if args.only and not fname.startswith(args.only):
                continue
            write(os.path.join(args.out, fname), name, m, ftype, tok)
            print(fname)


if __name__ == "__main__":
    main()
