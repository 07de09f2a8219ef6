#!/usr/bin/env python3
"""Writes tiny random-weight Hugging Face checkpoints (bf16 safetensors) for Llama, Qwen3 and Qwen3-MoE,
byte for byte reproducibly, with a real tokenizer.json.

    python gen-checkpoints.py --tokenizer-from models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR

Each folder (DIR/hf-llama, DIR/hf-qwen3, DIR/hf-qwen3moe) holds config.json, model.safetensors,
tokenizer.json, tokenizer_config.json (with SmolLM2's chat template) and generation_config.json, as
transformers writes them. Weights are seeded per tensor (sha256 of "family/tensor"), drawn uniform with
numpy's PCG64 and written bf16 with a hand-written safetensors writer, so the bytes depend only on this
script and numpy. scripts/mlx/make-checkpoints.sh then quantizes them with mlx_lm.convert.

The tokenizer is SmolLM2's (49,152 pieces, its merges and its special tokens, read from the GGUF), written
as the tokenizer.json SmolLM2 ships: BPE, byte-level. Each family gets its own real pre-tokenizer around
the same vocabulary, so three tokenizer.json dialects are covered: SmolLM2's (digits split one by one, then
ByteLevel's own GPT-2 regex), Llama 3's (its Split regex, ignore_merges, a BOS post-processor) and Qwen's
(its Split regex and an NFC normalizer).
"""

import argparse
import hashlib
import json
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "families"))
from importlib import import_module  # noqa: E402

gen_ggufs = import_module("gen-ggufs")

LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

COMMON = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              intermediate_size=256, num_hidden_layers=2, vocab_size=gen_ggufs.VOCAB,
              rms_norm_eps=1e-5, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": dict(COMMON, architectures=["LlamaForCausalLM"], model_type="llama",
                  max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen3": dict(COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                  max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True,
                  attention_bias=False, rope_scaling=None, use_sliding_window=False,
                  sliding_window=None, max_window_layers=2),
    "qwen3moe": dict(COMMON, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                     max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False,
                     attention_bias=False, rope_scaling=None, use_sliding_window=False,
                     sliding_window=None, max_window_layers=2, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=128, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[], output_router_logits=False, router_aux_loss_coef=0.001),
}


def tensors(family, cfg):
    """(name, shape, scale) of every tensor, in the order transformers names them."""
    h, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h), 1.0)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,), "norm"),
                (f"{p}.post_attention_layernorm.weight", (h,), "norm"),
                (f"{p}.self_attn.q_proj.weight", (nh * hd, h), None),
                (f"{p}.self_attn.k_proj.weight", (nkv * hd, h), None),
                (f"{p}.self_attn.v_proj.weight", (nkv * hd, h), None),
                (f"{p}.self_attn.o_proj.weight", (h, nh * hd), None)]
        if family != "llama":
            out += [(f"{p}.self_attn.q_norm.weight", (hd,), "norm"),
                    (f"{p}.self_attn.k_norm.weight", (hd,), "norm")]
        if family == "qwen3moe":
            e, eff = cfg["num_experts"], cfg["moe_intermediate_size"]
            out.append((f"{p}.mlp.gate.weight", (e, h), None))
            for x in range(e):
                out += [(f"{p}.mlp.experts.{x}.gate_proj.weight", (eff, h), None),
                        (f"{p}.mlp.experts.{x}.up_proj.weight", (eff, h), None),
                        (f"{p}.mlp.experts.{x}.down_proj.weight", (h, eff), None)]
        else:
            out += [(f"{p}.mlp.gate_proj.weight", (ff, h), None),
                    (f"{p}.mlp.up_proj.weight", (ff, h), None),
                    (f"{p}.mlp.down_proj.weight", (h, ff), None)]
    out.append(("model.norm.weight", (h,), "norm"))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], h), None))
    return out


def bf16(a):
    """Round-to-nearest-even float32 -> bfloat16 bits."""
    u = a.astype(np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def values(family, name, shape, scale):
    seed = int.from_bytes(hashlib.sha256(f"{family}/{name}".encode()).digest()[:8], "little")
    rng = np.random.Generator(np.random.PCG64(seed))
    if scale == "norm":
        return (1.0 + rng.uniform(-0.2, 0.2, size=shape)).astype(np.float32)
    bound = scale if scale is not None else 1.7 / np.sqrt(shape[-1])
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def write_safetensors(path, items):
    header, blobs, at = {}, [], 0
    for name, arr in items:
        data = bf16(arr).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(arr.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for b in blobs:
            f.write(b)


def tokenizer_json(kv, family):
    tokens = kv["tokenizer.ggml.tokens"][1][1]
    types = kv["tokenizer.ggml.token_type"][1][1]
    merges = kv["tokenizer.ggml.merges"][1][1]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": family == "smollm"}
    if family == "llama":
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_RE}, "behavior": "Isolated", "invert": False},
            byte_level]}
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<|im_start|>", "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                    "tokens": ["<|im_start|>"]}}}
        norm = None
    elif family == "qwen3":
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_RE}, "behavior": "Isolated", "invert": False},
            byte_level]}
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        norm = {"type": "NFC"}
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        norm = None
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": norm, "pre_tokenizer": pre, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": family == "llama",
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": merges},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only")
    args = ap.parse_args()
    kv = gen_ggufs.Reader(args.tokenizer_from).kv
    template = kv["tokenizer.chat_template"][1]
    tokenizer_family = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "smollm"}
    for family, cfg in FAMILIES.items():
        if args.only and family != args.only:
            continue
        d = os.path.join(args.out, f"hf-{family}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": [2], "do_sample": False}, f, indent=2)
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            json.dump(tokenizer_json(kv, tokenizer_family[family]), f, ensure_ascii=False)
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"add_bos_token": family == "llama", "bos_token": "<|im_start|>",
                       "eos_token": "<|im_end|>", "chat_template": template,
                       "model_max_length": cfg["max_position_embeddings"],
                       "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False},
                      f, indent=2)
        items = [(n, values(family, n, s, sc)) for n, s, sc in tensors(family, cfg)]
        write_safetensors(os.path.join(d, "model.safetensors"), items)
        print(d)


if __name__ == "__main__":
    main()
