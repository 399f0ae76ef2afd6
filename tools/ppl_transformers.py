#!/usr/bin/env python3
"""Reference perplexity with transformers, following DESIGN.md section 1 (the GPTQ/SparseGPT/AWQ protocol).

    python3 tools/ppl_transformers.py MODEL_DIR --text FILE --seq-len N [--max-tokens N] [--json OUT]

Protocol (what `wgpress eval` must reproduce):
  * the whole text file (read as UTF-8, unchanged) is tokenized as ONE stream with the model's
    tokenizer.json, without BOS/EOS or any other added token;
  * the first --max-tokens tokens are kept (all if not given);
  * the stream is cut into non-overlapping windows of --seq-len tokens; a trailing partial window is
    dropped;
  * each window is one independent forward pass (positions 0..seq_len-1, no cache, no BOS), and is
    scored on every token but its first (seq_len - 1 predicted tokens a window);
  * ppl = exp(mean cross-entropy in nats over all scored tokens).
Model in float32 on the CPU (TF32 irrelevant there), log-softmax taken in float64, sums in float64.
"""

import argparse
import json
import math
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="Hugging Face checkpoint directory")
    ap.add_argument("--text", required=True, help="text file (UTF-8)")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, default=None, help="keep only the stream's first N tokens")
    ap.add_argument("--batch", type=int, default=1, help="windows per forward call (does not change the result)")
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="transformers attention implementation")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the numbers (and per-window losses) here")
    args = ap.parse_args()

    import numpy as np
    import tokenizers
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    with open(args.text, encoding="utf-8", newline="") as f:
        text = f.read()

    # Tokenize: the raw tokenizers.Tokenizer (what the Rust side uses) and AutoTokenizer must agree.
    raw = tokenizers.Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    ids = raw.encode(text, add_special_tokens=False).ids
    hf_tok = AutoTokenizer.from_pretrained(args.model)
    ids_hf = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ids_hf, "tokenizers and AutoTokenizer disagree"
    n_text_tokens = len(ids)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    L = args.seq_len
    n_windows = len(ids) // L
    assert n_windows >= 1, f"only {len(ids)} tokens for seq-len {L}"
    used = np.asarray(ids[: n_windows * L], dtype=np.int64).reshape(n_windows, L)

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    t_load = time.time() - t0

    print(f"model {args.model}: {sum(p.numel() for p in model.parameters())} params, attn {args.attn}, "
          f"threads {torch.get_num_threads()}")
    print(f"text {args.text}: {len(text)} chars, {n_text_tokens} tokens; kept {len(ids)}; "
          f"{n_windows} windows of {L} ({len(ids) - n_windows * L} trailing tokens dropped), "
          f"{n_windows * (L - 1)} scored tokens", flush=True)

    window_nll = []
    t0 = time.time()
    with torch.no_grad():
        for b in range(0, n_windows, args.batch):
            x = torch.from_numpy(used[b : b + args.batch])
            logits = model(input_ids=x, use_cache=False).logits  # [B, L, V] f32
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # [B, L-1] f64
            for row in nll.sum(-1).tolist():
                window_nll.append(row)
            done = len(window_nll)
            el = time.time() - t0
            print(f"  window {done}/{n_windows}  running loss {sum(window_nll) / (done * (L - 1)):.6f}  "
                  f"{el:.1f}s (eta {el / done * (n_windows - done):.0f}s)", flush=True)
    t_eval = time.time() - t0

    n_scored = n_windows * (L - 1)
    mean_loss = math.fsum(window_nll) / n_scored
    ppl = math.exp(mean_loss)
    print(f"tokens {len(ids)}  windows {n_windows}  scored {n_scored}  mean loss {mean_loss:.6f}  ppl {ppl:.4f}  "
          f"(load {t_load:.1f}s, eval {t_eval:.1f}s)")

    if args.json:
        out = {
            "model": args.model, "text": args.text, "text_chars": len(text), "text_tokens": n_text_tokens,
            "max_tokens": args.max_tokens, "tokens": len(ids), "seq_len": L, "windows": n_windows,
            "scored_tokens": n_scored, "mean_loss": mean_loss, "ppl": ppl,
            "first_ids": ids[:16], "window_mean_loss": [s / (L - 1) for s in window_nll],
            "dtype": "float32", "device": "cpu", "attn_implementation": args.attn,
            "eval_seconds": t_eval, "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__},
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
