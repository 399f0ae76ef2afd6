#!/usr/bin/env python3
"""Checks a wgpress GGUF export with the `gguf` package (llama.cpp's gguf-py).

    python3 tools/check_gguf.py MODEL.gguf DENSE_DIR

DENSE_DIR is a dense f32 export of the same model and grid (`--format dense --dtype f32`), i.e.
our dequantized weights under Hugging Face names. The file is read with gguf.GGUFReader, every
tensor dequantized with gguf.quants.dequantize, attn_q/attn_k rows returned from llama.cpp's RoPE
order (the inverse of convert_hf_to_gguf's permute), and compared with the dense tensor:
F32, Q4_0 and Q8_0 must match bit for bit; F16/BF16 must equal the dense tensor rounded to that
type; Q4_1 may differ by the rounding of its f16 minimum m, |diff| <= 2^-11 |m| + 2^-24 |x| per
block (plus one f32 rounding). Also checks the header and metadata llama.cpp needs. Prints one
line per problem and "N tensors checked, M mismatched, P problems"; exits 1 on any.

Needs: numpy, safetensors, gguf (tested with 0.19.0).
"""
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import gguf
from gguf import GGMLQuantizationType as T

NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name):
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    _, idx, module, kind = name.split(".")
    return f"model.layers.{idx}.{NAMES[module]}.{kind}"


def unpermute(w, n_head):
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    path, dense_dir = Path(sys.argv[1]), Path(sys.argv[2])
    if path.is_dir():
        path = path / "model.gguf"
    r = gguf.GGUFReader(str(path))
    dense = load_file(str(dense_dir / "model.safetensors"))
    problems = []
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF" or int.from_bytes(head[4:8], "little") != 3:
        problems.append(f"header {head!r} is not GGUF v3")
    if field(r, "general.architecture") != "llama":
        problems.append(f"general.architecture {field(r, 'general.architecture')!r}")
    if field(r, "general.alignment") != 32:
        problems.append(f"general.alignment {field(r, 'general.alignment')!r}")
    for k in ["llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
              "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
              "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.vocab_size",
              "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"]:
        if field(r, k) is None:
            problems.append(f"metadata {k} missing")
    n_head = field(r, "llama.attention.head_count")
    n_kv = field(r, "llama.attention.head_count_kv")
    vocab = field(r, "llama.vocab_size")
    toks = field(r, "tokenizer.ggml.tokens") or []
    if len(toks) != vocab:
        problems.append(f"{len(toks)} tokens for vocab_size {vocab}")
    checked = mismatched = 0
    seen = set()
    for t in r.tensors:
        name = hf_name(t.name)
        seen.add(name)
        ref = dense.get(name)
        checked += 1
        if ref is None:
            problems.append(f"{t.name} -> {name} missing from the dense reference")
            continue
        ref = ref.astype(np.float32)
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        perm = {"attn_q": n_head, "attn_k": n_kv}.get(t.name.split(".")[2] if t.name.startswith("blk.") else "")
        if perm:
            w = unpermute(w, perm)
        if w.shape != ref.shape:
            problems.append(f"{t.name}: shape {w.shape} vs dense {ref.shape}")
            continue
        ty = t.tensor_type
        if ty in (T.F32, T.Q4_0, T.Q8_0):
            want, ok = ref, np.array_equal(w.view(np.uint32), ref.view(np.uint32))
        elif ty == T.F16:
            want = ref.astype(np.float16).astype(np.float32)
            ok = np.array_equal(w, want)
        elif ty == T.BF16:
            u = ref.view(np.uint32)
            want = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).view(np.float32)  # round to nearest even
            ok = np.array_equal(w, want)
        elif ty == T.Q4_1:
            blocks = np.frombuffer(t.data.tobytes(), dtype=np.uint8).reshape(-1, 20)
            m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(-1)
            m = np.repeat(np.abs(m), 32).reshape(int(t.shape[1]), int(t.shape[0]))
            if perm:
                m = unpermute(m, perm)
            tol = m * 2.0**-11 + np.abs(ref) * 2.0**-23 + 2.0**-30
            want, ok = ref, bool(np.all(np.abs(w - ref) <= tol))
        else:
            problems.append(f"{t.name}: unexpected type {ty.name}")
            continue
        if not ok:
            d = np.abs(w - want)
            print(f"MISMATCH {t.name} ({ty.name}): {(d > 0).sum()} of {d.size} values differ, max |diff| {d.max():.3e}")
            mismatched += 1
    for k in dense:
        if k not in seen:
            problems.append(f"{k} in the dense reference but not in the GGUF file")
    for p in problems:
        print("PROBLEM", p)
    types = sorted({t.tensor_type.name for t in r.tensors})
    print(f"gguf {path.name}: {len(r.tensors)} tensors ({', '.join(types)}), {len(r.fields)} metadata keys; "
          f"{checked} tensors checked, {mismatched} mismatched, {len(problems)} problems")
    return 1 if mismatched or problems else 0


if __name__ == "__main__":
    sys.exit(main())
