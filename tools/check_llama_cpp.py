#!/usr/bin/env python3
"""Loads a wgpress GGUF export with llama.cpp itself (PyPI `llama-cpp-python`) and checks it.

    python3 tools/check_llama_cpp.py OUT/model.gguf [--prompt TEXT] [--n 40]
        [--hf-dir DIR] [--text FILE --seq-len 256 --max-tokens 2048] [--kv-f32]

1. Loads the file with llama_cpp.Llama (a load failure exits 2) and prints n_vocab, n_ctx_train
   and the metadata llama.cpp read.
2. Tokenizes the prompt and a few fixed strings (digits, punctuation, runs of spaces, newlines,
   non-ASCII) with llama.cpp (no BOS, special tokens not parsed) and with the Hugging Face
   tokenizer (`tokenizers`, DIR/tokenizer.json, no special tokens); DIR is --hf-dir, or the GGUF's
   own directory when it holds tokenizer.json (wgpress writes one next to model.gguf). With --text
   the whole text is compared too. Any difference exits 1 after the remaining steps.
3. Generates --n tokens greedily (argmax of llama.cpp's logits, i.e. temperature 0) after the
   prompt and prints them; stops early at an end-of-generation token.
4. With --text: llama.cpp's perplexity under `wgpress eval`'s protocol, on the same token ids
   (the Hugging Face tokenizer's, as `wgpress eval` uses): the text as one stream without BOS,
   the first --max-tokens tokens, non-overlapping windows of --seq-len (a trailing partial window
   dropped), each window run on its own and scored on every token but its first,
   ppl = exp(mean loss). Compare with `wgpress eval OUT --text FILE --seq-len S --max-tokens N`.

Exit status: 0 all good, 1 token mismatch, 2 load failure.
Needs: llama-cpp-python (tested with 0.3.36), numpy, tokenizers.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

FIXED = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "In 1597, 42 copies cost 3.50 each; 2024-11-29 12:30.",
    "  two  spaces,\ta tab,\n\nnewlines\n and 'quotes' don't won't I'll.",
    "Caf\u00e9 na\u00efve \u2014 \u00bfQu\u00e9? \u65e5\u672c\u8a9e \U0001F600",
]


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--n", type=int, default=40, help="tokens to generate greedily")
    ap.add_argument("--hf-dir", help="directory with the source tokenizer.json (default: the GGUF's directory)")
    ap.add_argument("--text", help="text for the tokenizer comparison and the perplexity")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-f32", action="store_true",
                    help="keep llama.cpp's K/V cache in f32 (its default is f16) to see how much of a gap that is")
    ap.add_argument("--verbose", action="store_true", help="llama.cpp's own log")
    args = ap.parse_args()

    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}")
    n_ctx = max(args.seq_len, 64)
    try:
        llm = llama_cpp.Llama(
            model_path=args.gguf,
            n_ctx=max(n_ctx, 512),
            n_batch=max(n_ctx, 512),
            logits_all=True,
            n_threads=args.threads,
            **({"type_k": 0, "type_v": 0} if args.kv_f32 else {}),  # 0 = GGML_TYPE_F32
            verbose=args.verbose,
        )
    except Exception as e:  # llama-cpp-python raises ValueError on a failed load
        print(f"LOAD FAILED: {args.gguf}: {type(e).__name__}: {e}")
        return 2
    print(f"loaded {args.gguf}: n_vocab {llm.n_vocab()}, n_ctx_train {llm._model.n_ctx_train()}, "
          f"n_embd {llm._model.n_embd()}, params {llm._model.n_params()}")
    for k in sorted(llm.metadata):
        v = llm.metadata[k]
        print(f"  {k} = {v if len(v) <= 80 and chr(10) not in v else repr(v[:77]) + '...'}")

    # -- tokenizer agreement -------------------------------------------------------------------
    hf_dir = args.hf_dir
    if hf_dir is None and os.path.exists(os.path.join(os.path.dirname(os.path.abspath(args.gguf)), "tokenizer.json")):
        hf_dir = os.path.dirname(os.path.abspath(args.gguf))
    hf = None
    if hf_dir is not None:
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
        print(f"HF tokenizer: {os.path.join(hf_dir, 'tokenizer.json')}")
    else:
        print("no HF tokenizer (give --hf-dir): token ids not compared")

    def lc_tok(s):
        return llm.tokenize(s.encode("utf-8"), add_bos=False, special=False)

    mismatches = 0
    body = None
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            body = f.read()
    samples = [("prompt", args.prompt)] + [(f"fixed {i}", s) for i, s in enumerate(FIXED)]
    if body is not None:
        samples.append((f"text {args.text}", body))
    if hf is not None:
        for what, s in samples:
            a = lc_tok(s)
            b = hf.encode(s, add_special_tokens=False).ids
            d = first_diff(a, b)
            if d is None:
                print(f"tokens agree on {what}: {len(a)} ids" + (f" {a}" if len(a) <= 24 else ""))
            else:
                mismatches += 1
                ctx = slice(max(0, d - 3), d + 5)
                print(f"TOKEN MISMATCH on {what} at id {d} (llama.cpp {len(a)} ids, HF {len(b)}): "
                      f"llama.cpp {a[ctx]} {[llm.detokenize([t]) for t in a[ctx]]} vs "
                      f"HF {b[ctx]} {[hf.id_to_token(t) for t in b[ctx]]}")

    # -- greedy generation ---------------------------------------------------------------------
    prompt_ids = lc_tok(args.prompt)
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(args.n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, nxt):
            break
        llm.eval([nxt])
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    print(f"greedy {len(out)} tokens after {args.prompt!r} ({len(prompt_ids)} prompt ids): {out}")
    print(f"greedy text: {args.prompt!r} + {text!r}")

    # -- perplexity ----------------------------------------------------------------------------
    if body is not None:
        if hf is not None:
            ids = hf.encode(body, add_special_tokens=False).ids
            src = "HF tokenizer"
        else:
            ids = lc_tok(body)
            src = "llama.cpp tokenizer"
        ids = ids[: args.max_tokens]
        s = args.seq_len
        windows = [ids[i : i + s] for i in range(0, len(ids) - s + 1, s)]
        if not windows:
            print(f"text has {len(ids)} tokens, fewer than one window of {s}")
            return 1
        t0 = time.time()
        nll, scored = 0.0, 0
        for w in windows:
            llm.reset()
            llm.eval(w)
            logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
            m = logits.max(axis=1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))[:-1]
            tgt = logits[np.arange(len(w) - 1), w[1:]]
            nll += float((lse - tgt).sum())
            scored += len(w) - 1
        ppl = math.exp(nll / scored)
        print(f"llama.cpp perplexity {ppl:.4f} (mean loss {nll / scored:.6f} nats) on {len(ids)} tokens "
              f"({src}) of {args.text} in {len(windows)} windows of {s}, {scored} scored, "
              f"K/V cache {'f32' if args.kv_f32 else 'f16'}, {time.time() - t0:.1f} s")

    if mismatches:
        print(f"FAIL: {mismatches} tokenizer mismatch(es)")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
