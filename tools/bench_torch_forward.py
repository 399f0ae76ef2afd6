"""PyTorch/transformers baseline for `wgpress bench forward`: whole-model forward throughput of a
Hugging Face checkpoint (e.g. one written by `wgpress synth --shape smollm2-135m`) in float32 with
TF32 off, batch 1, on random token ids, timed with CUDA events after a warm-up window.
Usage: python3 tools/bench_torch_forward.py MODEL_DIR --seq-len 2048 --windows 8
"""
import argparse
import json

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).cuda().eval()
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = [torch.randint(0, vocab, (1, args.seq_len), device="cuda", generator=g)
           for _ in range(args.windows + 1)]
    with torch.no_grad():
        model(ids[0]).logits.float()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for w in ids[1:]:
            model(w).logits.float()
        end.record()
        torch.cuda.synchronize()
    ms = start.elapsed_time(end) / args.windows
    row = {"seq_len": args.seq_len, "windows": args.windows, "ms_per_window": ms,
           "tokens_per_s": args.seq_len / (ms / 1e3),
           "attn": getattr(model.config, "_attn_implementation", "?")}
    print(f"transformers {row['attn']} f32: seq {args.seq_len} x {args.windows} windows: "
          f"{ms:.2f} ms/window, {row['tokens_per_s']:.0f} tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
