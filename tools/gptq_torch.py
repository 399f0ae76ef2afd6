#!/usr/bin/env python3
"""Plain PyTorch GPTQ (Frantar et al. 2022) with the conventions of src/quant/gptq.rs and the grid of
src/quant/grid.rs (DESIGN.md section 4): the baseline that the wgpu GPTQ is timed and judged against.

Conventions (the same seven as src/quant/gptq.rs):
 1. dead columns (H_ii == 0): H_ii = 1, W[:, i] = 0;
 2. H += damp * mean(diag H) * I (mean after 1); on a failed Cholesky, damp *= 10 (in f32) and retry,
    at most MAX_DAMP_RETRIES times;
 3. act-order: descending diag H after 1-2 (computed in f64), ties keep the lower index (stable);
 4. U = upper Cholesky factor of H^-1 in processing order (cholesky, cholesky_inverse, cholesky upper);
 5. blocks of `block` positions: q = quant(w), err = (w - deq(q)) / U_ii, in-block w_j -= err U_ij,
    lazy W[:, rest] -= Err U[block, rest] after each block;
 6. groups = runs of `group` positions, grid fitted (min-max or MSE search) on the f32-rounded current
    weights of the group's positions (in-block updates included; positions beyond the block carry
    only the lazy updates of earlier blocks) when its first position is reached; without a group
    size one grid per row fitted on W before the loop; g_idx[c] = position of c // group;
 7. static groups: all grids fitted on W (after 1) before the loop on original column groups,
    g_idx[c] = c // group.
The grid (always f32, whatever --dtype): range contains 0; all-zero range -> [-1, 1]; scale rounded to
f16 (ties to even) and clamped to [2^-14, 65504]; asymmetric zero never 0 (a group whose zero rounds
to 0 is spanned as [0, max] with maxq - 1 steps and zero 1); q = clamp(round(w/scale) + zero, 0, maxq)
with torch.round (ties to even); deq = scale * (q - zero).

Subcommands:
  bench  --shapes 4096x4096,11008x4096 --bits 4 --group 128 [--act-order] --device cuda --tokens 4096
         --json OUT: per rows x cols shape, random W (std 0.02) and H = 2/n X^T X of a random X with a
         few heavy channels; one warm-up, --hold-clock seconds of GPU load (default 0.5), then the
         whole per-layer GPTQ timed (synchronized) with its
         phases (factor = dead/damp/order/cholesky/inverse/cholesky, columns = in-block column loop with
         group fits, lazy = lazy updates) timed by CUDA events; prints a table, writes JSON
         [{shape, seconds, phases, peak_mem_bytes}] (peak CUDA allocation of the timed run beyond
         W and H; null on the CPU).
  model  --model HF_DIR --calib-tokens FILE.safetensors --bits 4 --group 128 [--act-order] [--sym]
         [--static-groups] [--mse] --damp 0.01 --device cuda|cpu [--out OUT_DIR] [--max-blocks N]
         [--forward-dtype float32|float16|bfloat16] [--batch B] [--json FILE]:
         layer-by-layer GPTQ of a Llama checkpoint (as the original GPTQ repo's llama.py): the inputs
         of block 0 are captured from the embedding; each block is moved to the device, run on all
         calibration sequences once per true-sequential group (q/k/v, o, gate/up, down) with hooks
         accumulating each linear's H = 2/n X^T X in f32 from its inputs (TF32 off, torch's default),
         each group GPTQ'd in f32 on W.float() and written back (fake-quantized) in the layer's dtype,
         then run once more to give the next block's inputs. Prints one line per block (its time and
         each linear's relative output error tr(D H D^T) / tr(W H W^T) with the time of its GPTQ and
         error), then the phase times and peaks.
           --out: save the model as a dense f32 HF directory (fake-quantized weights); without it
             nothing is saved (for timing runs: saving a 7B model in f32 takes minutes).
           --max-blocks N: quantize blocks 0..N-1 only, then stop (says so); the per-block times
             allow an extrapolation to all blocks (printed; block 0 carries the warm-up, so the mean
             of the later blocks is used).
           --forward-dtype (default float32): the dtype in which the model is loaded (tensor by
             tensor: a 16-bit checkpoint is not materialized in f32 on the host) and the decoder
             layers run (the original GPTQ repo uses float16). H and GPTQ stay f32; a 16-bit layer
             gets its dequantized weights rounded to its dtype.
           --batch B (default 1): calibration sequences per decoder-layer call; larger B amortizes
             the per-call overhead for more activation memory (B x seqlen tokens per call). H is
             the same sum with the running rescale done per call, so results move by float
             rounding only.
           --json FILE: {"blocks", "per_block_seconds", "phases", "peak_gpu_bytes",
             "peak_host_bytes", ...}. Phases (synchronized wall clock): load (model load), embed
             (block-0 input capture), forward (the decoder-layer calls, hooks included), hessian
             (inside the hooks, part of forward; CUDA events on a GPU), gptq (gptq_layer), error
             (output_error), move (block to and from the device), save (with --out), total (the
             command after CUDA init), blocks (the block loop).
  check  --dump FILE [--dtype float64|float32]: compares this script's GPTQ with the Rust f64
         reference (src/reference/gptq.rs) on the cases the Rust side wrote:
             WGPRESS_GPTQ_DUMP=/tmp/gptq_dump.safetensors \\
                 cargo test --lib reference::gptq::tests::dump_for_torch_check -- --ignored
             python3 tools/gptq_torch.py check --dump /tmp/gptq_dump.safetensors
         With --dtype float64 (default) the integers, grids, g_idx, perm and damp must agree exactly;
         exits 1 otherwise. (float32 reports how many integers move, for information.)
         This is how the script was checked against the Rust reference; it is not part of cargo test.

Only torch, transformers, safetensors and numpy are used.
"""

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

MAX_DAMP_RETRIES = 4  # src/quant/gptq.rs
MSE_NORM = 2.4  # src/quant/grid.rs
F16_MIN_NORMAL = 2.0**-14
F16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------------
# The grid (src/quant/grid.rs), vectorized over rows; always f32.


def round_scale(s):
    return s.clamp(F16_MIN_NORMAL, F16_MAX).half().float()


def fit_minmax(lo, hi, bits, sym):
    """lo, hi: f32 [rows] -> (scale f32 [rows], zero f32 [rows]) as QuantSpec::fit_minmax."""
    maxq = float(2**bits - 1)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if sym:
        amax = torch.maximum(-lo, hi)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = round_scale(2.0 * amax / maxq)
        zero = torch.full_like(scale, float((2**bits) // 2))
        return scale, zero
    both0 = (lo == 0) & (hi == 0)
    lo = torch.where(both0, -torch.ones_like(lo), lo)
    hi = torch.where(both0, torch.ones_like(hi), hi)
    scale = round_scale((hi - lo) / maxq)
    zero = torch.clamp(torch.round(-lo / scale), 0.0, maxq)
    z0 = zero == 0
    scale = torch.where(z0, round_scale(hi / (maxq - 1.0)), scale)
    zero = torch.where(z0, torch.ones_like(zero), zero)
    return scale, zero


def quantize(x, scale, zero, bits):
    """x f32 [rows, k], scale/zero [rows] or [rows, k] -> q f32 (integers)."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(x / scale) + zero, 0.0, float(2**bits - 1))


def dequantize(q, scale, zero):
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return scale * (q - zero)


_SHRINK = None


def shrink_factors():
    """1 - i/100 for i in 0..80, computed in f32 as mse_shrink_factors()."""
    global _SHRINK
    if _SHRINK is None:
        _SHRINK = [np.float32(1.0) - np.float32(i) / np.float32(100.0) for i in range(80)]
    return _SHRINK


def fit(x, bits, sym, mse):
    """Grid of each row of x (f32 [rows, k]), min-max or GPTQ's MSE search (QuantSpec::fit_mse)."""
    x = x.float()
    zero_t = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    lo = torch.minimum(x.min(dim=1).values, zero_t)
    hi = torch.maximum(x.max(dim=1).values, zero_t)
    if not mse:
        return fit_minmax(lo, hi, bits, sym)
    best_s, best_z = fit_minmax(lo, hi, bits, sym)
    best_err = torch.full_like(lo, float("inf"))
    for p in shrink_factors():
        p = float(p)  # exact: an f32 value
        s, z = fit_minmax(lo * p, hi * p, bits, sym)
        # Note: the Rust reference sums in f32 sequentially; the sum order here differs, so a
        # near-tie between two shrink factors may rarely pick another candidate.
        err = (dequantize(quantize(x, s, z, bits), s, z) - x).abs().pow(MSE_NORM).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


# ---------------------------------------------------------------------------------------------------
# GPTQ of one layer.


class Phases:
    """Accumulated phase times: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.events = {}
        self.secs = {}

    @contextmanager
    def __call__(self, name):
        if self.cuda:
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            yield
            e.record()
            self.events.setdefault(name, []).append((s, e))
        else:
            t = time.perf_counter()
            yield
            self.secs[name] = self.secs.get(name, 0.0) + time.perf_counter() - t

    def result(self):
        if self.cuda:
            torch.cuda.synchronize()
            for name, evs in self.events.items():
                self.secs[name] = sum(s.elapsed_time(e) for s, e in evs) / 1000.0
        return dict(self.secs)


def factor(H, damp, act_order):
    """Rules 1-4 on a dead-fixed H: returns (perm, U, damp_used). H is not modified."""
    cols = H.shape[0]
    mean64 = 0.0
    for v in torch.diagonal(H).double().tolist():  # sequential f64 sum, as the Rust reference
        mean64 += v
    mean64 /= cols
    d = np.float32(damp)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        diag64 = torch.diagonal(H).double() + float(d) * mean64
        if act_order:
            perm = torch.argsort(diag64, descending=True, stable=True)
        else:
            perm = torch.arange(cols, device=H.device)
        Hd = H.clone()
        Hd.diagonal().copy_(diag64.to(H.dtype))
        Hp = Hd[perm][:, perm]
        L, info = torch.linalg.cholesky_ex(Hp)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return perm, U, float(d)
            what = "the inverse Hessian"
        else:
            what = "the damped Hessian"
        if attempt == MAX_DAMP_RETRIES:
            raise ValueError(
                f"gptq: the Cholesky factorization of {what} failed even with damp {float(d)} after "
                f"{MAX_DAMP_RETRIES} retries of ten times the damping (requested damp {damp}); "
                "the Hessian is far from positive definite"
            )
        d = np.float32(d * np.float32(10.0))


def gptq_layer(W, H, bits, group, sym=False, act_order=True, static_groups=False, mse=False,
               damp=0.01, block=128, dtype=torch.float32, phases=None, lazy_round=None):
    """GPTQ of W [rows, cols] with H [cols, cols] (= 2/n X^T X), on W's device, working in `dtype`.

    Returns dict(q uint8 [rows, cols], scales f32 [rows, G], zeros int32 [rows, G], g_idx int32 [cols],
    perm int64 [cols], deq f32 [rows, cols] (original column order), damp_used, dead_columns).
    `lazy_round` (e.g. torch.float16): the lazy updates' operands Err and U are rounded to that type
    first and multiplied in `dtype`, as a tensor-core product with f16 inputs and f32 accumulation
    would (`lazy16` measures what that does to the result).
    """
    if phases is None:
        phases = Phases(W.device)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"gptq: H is {tuple(H.shape)}, expected {cols}x{cols}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("gptq: the Hessian is not finite")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("gptq: the weights are not finite")
    g = cols if group is None else min(group, cols)
    if cols % g:
        raise ValueError(f"gptq: group size {g} does not divide the input dimension {cols}")
    n_groups = cols // g
    dev = W.device

    with phases("factor"):
        H = H.to(dtype).clone()
        W0 = W.float().clone()
        dead = torch.diagonal(H) == 0
        dead_columns = int(dead.sum())
        H.diagonal()[dead] = 1.0
        W0[:, dead] = 0.0
        perm, U, damp_used = factor(H, damp, act_order)
        pos_of = torch.empty_like(perm)
        pos_of[perm] = torch.arange(cols, device=dev)
        if static_groups:
            g_idx = torch.arange(cols, device=dev) // g
        else:
            g_idx = pos_of // g

    scales = torch.zeros(rows, n_groups, dtype=torch.float32, device=dev)
    zeros = torch.zeros(rows, n_groups, dtype=torch.float32, device=dev)
    fit_in_loop = group is not None and not static_groups
    if not fit_in_loop:
        for k in range(n_groups):
            scales[:, k], zeros[:, k] = fit(W0[:, k * g:(k + 1) * g], bits, sym, mse)
    g_idx_cpu = g_idx.tolist()
    perm_cpu = perm.tolist()

    Wp = W0[:, perm].to(dtype)
    Q = torch.zeros(rows, cols, dtype=torch.float32, device=dev)
    D = torch.zeros(rows, cols, dtype=torch.float32, device=dev)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        count = b1 - b0
        with phases("columns"):
            W1 = Wp[:, b0:b1].clone()
            U1 = U[b0:b1, b0:b1]
            Err1 = torch.zeros(rows, count, dtype=dtype, device=dev)
            for i in range(count):
                pos = b0 + i
                if fit_in_loop and pos % g == 0:
                    end = pos + g
                    cur = W1[:, i:min(end - b0, count)]
                    if end > b1:
                        cur = torch.cat([cur, Wp[:, b1:end]], dim=1)
                    k = pos // g
                    scales[:, k], zeros[:, k] = fit(cur, bits, sym, mse)
                k = g_idx_cpu[perm_cpu[pos]]
                w = W1[:, i]
                q = quantize(w.float()[:, None], scales[:, k], zeros[:, k], bits)[:, 0]
                dq = dequantize(q[:, None], scales[:, k], zeros[:, k])[:, 0]
                Q[:, pos] = q
                D[:, pos] = dq
                err = (w - dq.to(dtype)) / U1[i, i]
                W1[:, i + 1:] -= err[:, None] * U1[i, i + 1:][None, :]
                Err1[:, i] = err
        with phases("lazy"):
            if b1 < cols:
                E, Ub = Err1, U[b0:b1, b1:]
                if lazy_round is not None:
                    E, Ub = E.to(lazy_round).to(dtype), Ub.to(lazy_round).to(dtype)
                Wp[:, b1:] -= E @ Ub

    return {
        "q": Q[:, pos_of].to(torch.uint8),
        "scales": scales,
        "zeros": zeros.to(torch.int32),
        "g_idx": g_idx.to(torch.int32),
        "perm": perm,
        "deq": D[:, pos_of],
        "damp_used": damp_used,
        "dead_columns": dead_columns,
    }


def output_error(W, deq, H):
    """tr(D H D^T) / tr(W H W^T) with D = W - deq, in f64 (reference::gptq::layer_output_error)."""
    W, deq, H = W.double(), deq.double(), H.double()
    D = W - deq
    num = float(((D @ H) * D).sum())
    den = float(((W @ H) * W).sum())
    return 0.0 if num == 0 else num / den


# ---------------------------------------------------------------------------------------------------
# bench


def random_layer(rows, cols, tokens, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    W = (torch.randn(rows, cols, generator=gen) * 0.02).to(device)
    X = torch.randn(tokens, cols, generator=gen)
    heavy = torch.randperm(cols, generator=gen)[: max(1, cols // 512)]
    X[:, heavy] *= 20.0  # a few heavy channels, as in LLM activations
    X = X.to(device)
    H = (2.0 / tokens) * (X.T @ X)
    return W, H


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def hold_clock(device, secs):
    """Keeps the GPU busy for `secs` (f32 matmuls), so the timed run that follows starts at the
    clock the GPU holds under load: an idle H200 drops to 345 MHz within seconds (BENCHMARKS.md,
    session 16). The same hold as `wgpress bench gptq --hold-clock`."""
    if device.type != "cuda" or secs <= 0:
        return
    a = torch.randn(2048, 2048, device=device)
    t = time.perf_counter()
    while time.perf_counter() - t < secs:
        for _ in range(8):
            a = a @ a
            a = a / a.abs().max()
        torch.cuda.synchronize()


def cmd_bench(a):
    device = torch.device(a.device)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s]
    results = []
    print(f"GPTQ {a.bits}-bit group {a.group} act-order {a.act_order} block {a.block} "
          f"on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})")
    print(f"{'shape':>14} {'total s':>9} {'factor s':>9} {'columns s':>10} {'lazy s':>8} {'peak MiB':>9}")
    for rows, cols in shapes:
        W, H = random_layer(rows, cols, a.tokens, device, seed=rows * 7 + cols)
        kw = dict(bits=a.bits, group=a.group, sym=a.sym, act_order=a.act_order,
                  static_groups=a.static_groups, mse=a.mse, damp=a.damp, block=a.block)
        gptq_layer(W, H, **kw)  # warm-up
        sync(device)
        hold_clock(device, a.hold_clock)  # before the peak is reset: its operands are not GPTQ's
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        phases = Phases(device)
        t = time.perf_counter()
        gptq_layer(W, H, phases=phases, **kw)
        sync(device)
        secs = time.perf_counter() - t
        ph = phases.result()
        peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
        results.append({"shape": f"{rows}x{cols}", "seconds": secs, "phases": ph,
                        "peak_mem_bytes": peak})
        print(f"{rows:>7}x{cols:<6} {secs:9.3f} {ph.get('factor', 0):9.3f} {ph.get('columns', 0):10.3f} "
              f"{ph.get('lazy', 0):8.3f} {(peak or 0) / 2**20:9.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {a.json}")


def cmd_lazy16(a):
    """GPTQ with f32 lazy updates against the same with f16-rounded lazy operands (f32 products):
    integers that differ, and the layer output error of each, on random layers with heavy channels."""
    print(f"GPTQ {a.bits}-bit group {a.group} act-order {a.act_order} block {a.block}, "
          f"{a.tokens} tokens; lazy operands f32 vs rounded to f16")
    print(f"{'shape':>12} {'seed':>5} {'q differ':>10} {'of':>10} {'err f32':>11} {'err f16':>11} {'ratio':>8}")
    for s in [v for v in a.shapes.split(",") if v]:
        rows, cols = (int(v) for v in s.lower().split("x"))
        for seed in range(a.seeds):
            W, H = random_layer(rows, cols, a.tokens, torch.device("cpu"), seed=seed * 1000 + cols)
            kw = dict(bits=a.bits, group=a.group, sym=a.sym, act_order=a.act_order, damp=a.damp,
                      block=a.block)
            r32 = gptq_layer(W, H, **kw)
            r16 = gptq_layer(W, H, lazy_round=torch.float16, **kw)
            differ = int((r32["q"] != r16["q"]).sum())
            e32, e16 = output_error(W, r32["deq"], H), output_error(W, r16["deq"], H)
            print(f"{rows:>5}x{cols:<6} {seed:>5} {differ:>10} {rows * cols:>10} {e32:11.4e} "
                  f"{e16:11.4e} {e16 / e32:8.5f}")


# ---------------------------------------------------------------------------------------------------
# model


class _Caught(Exception):
    pass


# True-sequential: each group is quantized with H taken from the block's forward pass in which the
# earlier groups of the same block are already fake-quantized (as GPTQ's --true-sequential).
SEQUENTIAL_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def load_llama(path, dtype=torch.float32):
    """LlamaForCausalLM in `dtype` on the host, loaded tensor by tensor (a 16-bit checkpoint read in
    a 16-bit dtype is never materialized in f32)."""
    from transformers import LlamaForCausalLM

    def load(**kw):
        try:
            return LlamaForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            return LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, **kw)

    try:
        # transformers 5 always loads this way and drops the argument; 4.x needs it (and accelerate).
        return load(low_cpu_mem_usage=True)
    except ImportError:  # transformers 4.x without accelerate
        return load()


def run_block(layer, inps, kwargs, batch=1, keep=True):
    """The layer on inps [N, T, C], `batch` sequences per call; returns the outputs (None if not keep).
    The captured kwargs (mask, positions, rotary cos/sin) have batch 1 and broadcast over the batch."""
    outs = torch.empty_like(inps) if keep else None
    for s in range(0, inps.shape[0], batch):
        o = layer(inps[s:s + batch], **kwargs)
        if keep:
            outs[s:s + batch] = o[0] if isinstance(o, (tuple, list)) else o
    return outs


class Timer:
    """Accumulated wall-clock phase times, synchronized with the device before each clock read."""

    def __init__(self, device):
        self.device = device
        self.secs = {}

    @contextmanager
    def __call__(self, name):
        sync(self.device)
        t = time.perf_counter()
        yield
        sync(self.device)
        self.add(name, time.perf_counter() - t)

    def add(self, name, secs):
        self.secs[name] = self.secs.get(name, 0.0) + secs


MODEL_PHASES = ["load", "embed", "forward", "hessian", "gptq", "error", "move", "save", "total"]


def cmd_model(a):
    import resource

    from safetensors.torch import load_file

    device = torch.device(a.device)
    fdtype = getattr(torch, a.forward_dtype)
    timer = Timer(device)
    sync(device)  # the CUDA context is made here, outside every phase but total
    t_start = time.perf_counter()
    with timer("load"):
        model = load_llama(a.model, fdtype)
    model.eval()
    model.config.use_cache = False
    ids = load_file(a.calib_tokens)["input_ids"].to(torch.long)
    if ids.dim() != 2:
        raise SystemExit(f"{a.calib_tokens}: input_ids must be [N, T], got {tuple(ids.shape)}")
    n, t = ids.shape
    layers = model.model.layers
    n_layers = len(layers)
    n_blocks = n_layers if a.max_blocks is None else min(a.max_blocks, n_layers)
    print(f"calibration: {n} x {t} tokens; {a.bits}-bit group {a.group} act-order {a.act_order} "
          f"sym {a.sym} static {a.static_groups} mse {a.mse} damp {a.damp} on {device}")
    print(f"forward {a.forward_dtype}, batch {a.batch}; blocks {n_blocks} of {n_layers}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

    # Inputs of block 0: stop the model at the first decoder layer.
    inps = []
    kw = {}

    def catch(module, args, kwargs):
        inps.append(args[0] if args else kwargs["hidden_states"])
        kw.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Caught()

    with timer("embed"):
        model.model.embed_tokens.to(device)
        model.model.rotary_emb.to(device)
        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        with torch.no_grad():
            for s in range(n):
                try:
                    model.model(input_ids=ids[s:s + 1].to(device), use_cache=False)
                except _Caught:
                    pass
        handle.remove()
        inps = torch.cat(inps, dim=0)
        kw["use_cache"] = False
        model.model.embed_tokens.cpu()
        model.model.rotary_emb.cpu()

    gptq_kw = dict(bits=a.bits, group=a.group, sym=a.sym, act_order=a.act_order,
                   static_groups=a.static_groups, mse=a.mse, damp=a.damp, block=a.block)
    per_block = []
    block_log = []
    blocks_secs = 0.0
    extrapolated = 0.0

    def write_json(finished):
        """The result so far; written to --json after every block (so a run stopped by a time limit
        still leaves its blocks) and at the end (finished: true)."""
        phases = {k: timer.secs.get(k, 0.0) for k in MODEL_PHASES
                  if (k != "save" or a.out) and (k != "total" or finished)}
        phases["blocks"] = blocks_secs if finished else sum(per_block)
        res = {"blocks": len(per_block), "per_block_seconds": per_block, "phases": phases,
               "peak_gpu_bytes": (torch.cuda.max_memory_allocated(device)
                                  if device.type == "cuda" else None),
               "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "finished": finished, "layers_in_model": n_layers,
               "extrapolated_all_blocks_seconds": extrapolated if finished else None,
               "block_log": block_log,
               "config": {"model": a.model, "calib_tokens": a.calib_tokens, "nsamples": n,
                          "seqlen": t, "bits": a.bits, "group": a.group, "act_order": a.act_order,
                          "sym": a.sym, "static_groups": a.static_groups, "mse": a.mse,
                          "damp": a.damp, "block": a.block, "forward_dtype": a.forward_dtype,
                          "batch": a.batch, "max_blocks": a.max_blocks, "device": str(device),
                          "device_name": (torch.cuda.get_device_name(device)
                                          if device.type == "cuda" else "cpu"),
                          "torch": torch.__version__}}
        if a.json:
            with open(a.json + ".tmp", "w") as f:
                json.dump(res, f, indent=1)
            os.replace(a.json + ".tmp", a.json)
        return res

    total = time.perf_counter()
    for li in range(n_blocks):
        layer = layers[li]
        sync(device)
        t0 = time.perf_counter()
        hess = Phases(device)  # time inside the Hessian hooks (CUDA events on a GPU)
        with timer("move"):
            layer.to(device)
        mods = dict(layer.named_modules())
        report = []
        errors = {}
        with torch.no_grad():
            for names in SEQUENTIAL_GROUPS:
                hdtype = getattr(torch, a.hessian_dtype)
                Hs = {nm: torch.zeros(mods[nm].in_features, mods[nm].in_features, device=device,
                                      dtype=hdtype)
                      for nm in names}
                counts = {nm: 0 for nm in names}

                def hook(nm):
                    def f(module, args, out):
                        with hess("hessian"):
                            # H is f32 whatever the forward dtype.
                            x = args[0].reshape(-1, args[0].shape[-1]).to(hdtype)
                            m = x.shape[0]
                            # Running H = 2/n X^T X over all tokens seen so far (as GPTQ's add_batch).
                            Hs[nm] *= counts[nm] / (counts[nm] + m)
                            counts[nm] += m
                            x = x * (2.0 / counts[nm]) ** 0.5
                            Hs[nm] += x.T @ x
                    return f

                handles = [mods[nm].register_forward_hook(hook(nm)) for nm in names]
                with timer("forward"):
                    run_block(layer, inps, kw, a.batch, keep=False)
                for h in handles:
                    h.remove()
                for nm in names:
                    lin = mods[nm]
                    W = lin.weight.data.float()  # GPTQ in f32 whatever the forward dtype
                    tq = time.perf_counter()
                    with timer("gptq"):
                        Hs[nm] = Hs[nm].float()  # GPTQ and the error are f32 whatever H was summed in
                        r = gptq_layer(W, Hs[nm], **gptq_kw)
                    with timer("error"):
                        err = output_error(W, r["deq"], Hs[nm])
                    short = nm.split('.')[-1]
                    errors[short] = err
                    report.append(f"{short} {err:.4e} ({time.perf_counter() - tq:.2f}s)")
                    lin.weight.data.copy_(r["deq"].to(lin.weight.dtype))
                    del Hs[nm], r
            with timer("forward"):
                inps = run_block(layer, inps, kw, a.batch)
        with timer("move"):
            layer.cpu()
        sync(device)
        dt = time.perf_counter() - t0
        timer.add("hessian", hess.result().get("hessian", 0.0))
        per_block.append(dt)
        block_log.append({"block": li, "seconds": dt, "errors": errors})
        print(f"layer {li}: {dt:.2f}s  " + ", ".join(report), flush=True)
        write_json(finished=False)
    blocks_secs = time.perf_counter() - total
    if n_blocks == n_layers:
        print(f"all layers: {blocks_secs:.2f}s")
    else:
        print(f"stopped early (--max-blocks {a.max_blocks}): quantized blocks 0..{n_blocks - 1} of "
              f"{n_layers} in {blocks_secs:.2f}s; blocks {n_blocks}..{n_layers - 1} are unchanged")
    # Block 0 carries the warm-up (CUDA kernels and cuBLAS handles made on first use), so the
    # extrapolation uses the later blocks where there are some.
    steady = per_block[1:] if len(per_block) > 1 else per_block
    mean = sum(steady) / len(steady) if steady else 0.0
    extrapolated = per_block[0] + mean * (n_layers - 1) if per_block else 0.0
    print(f"per block: mean {mean:.2f}s over blocks {1 if len(per_block) > 1 else 0}.."
          f"{len(per_block) - 1}; all {n_layers} blocks extrapolated: {extrapolated:.1f}s")

    if a.out:
        with timer("save"):
            os.makedirs(a.out, exist_ok=True)
            model.config.use_cache = True
            model.to(torch.float32)
            model.save_pretrained(a.out, max_shard_size="100000GB")
            for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "tokenizer.model", "generation_config.json"]:
                src = os.path.join(a.model, name)
                if os.path.exists(src) and not os.path.exists(os.path.join(a.out, name)):
                    shutil.copy(src, os.path.join(a.out, name))
        print(f"wrote {a.out}" + ("" if n_blocks == n_layers else
                                  f" (only blocks 0..{n_blocks - 1} quantized)"))
    sync(device)
    timer.add("total", time.perf_counter() - t_start)

    res = write_json(finished=True)
    notes = {"forward": "run_block calls incl. the Hessian hooks",
             "hessian": "inside the hooks (CUDA events on a GPU)",
             "move": "layer to and from the device", "blocks": "the block loop (sum of per-block)",
             "total": "whole command after CUDA init, incl. load"}
    for k, v in res["phases"].items():
        print(f"phase {k:<8} {v:9.2f}s" + (f"  ({notes[k]})" if k in notes else ""))
    if res["peak_gpu_bytes"] is not None:
        print(f"peak GPU memory {res['peak_gpu_bytes'] / 2**30:.2f} GiB, ", end="")
    print(f"peak host RSS {res['peak_host_bytes'] / 2**30:.2f} GiB")
    if a.json:
        print(f"wrote {a.json}")


# ---------------------------------------------------------------------------------------------------
# check against the Rust reference


def cmd_check(a):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    dtype = getattr(torch, a.dtype)
    t = load_file(a.dump)
    with safe_open(a.dump, "np") as f:
        cases = json.loads(f.metadata()["cases"])
    bad = 0
    print(f"{'case':>4} {'opts':<44} {'q diff':>9} {'grid diff':>9} {'g_idx/perm':>10} {'damp':>5} "
          f"{'err torch':>10} {'err rust':>10}")
    for k, c in enumerate(cases):
        o = c["opts"]
        spec = o["spec"]
        W = torch.from_numpy(t[f"{k}.w"])
        H = torch.from_numpy(t[f"{k}.h"])
        r = gptq_layer(W, H, bits=spec["bits"], group=spec["group"], sym=spec["sym"],
                       act_order=o["act_order"], static_groups=o["static_groups"], mse=o["mse"],
                       damp=o["damp"], block=o["block"], dtype=dtype)
        q_diff = int((r["q"].numpy() != t[f"{k}.q"]).sum())
        grid_diff = int((r["scales"].numpy() != t[f"{k}.scales"]).sum()
                        + (r["zeros"].numpy() != t[f"{k}.zeros"]).sum())
        order_ok = (np.array_equal(r["g_idx"].numpy(), t[f"{k}.g_idx"])
                    and np.array_equal(r["perm"].numpy().astype(np.int32), t[f"{k}.perm"]))
        damp_ok = (np.float32(r["damp_used"]) == np.float32(c["damp_used"])
                   and r["dead_columns"] == c["dead_columns"])
        deq_ok = np.array_equal(r["deq"].numpy(), t[f"{k}.deq"])
        e_t = output_error(W, r["deq"], H)
        e_r = output_error(W, torch.from_numpy(t[f"{k}.deq"]), H)
        desc = (f"{spec['bits']}b g{spec['group']} {'sym' if spec['sym'] else 'asym'}"
                f"{' act' if o['act_order'] else ''}{' static' if o['static_groups'] else ''}"
                f"{' mse' if o['mse'] else ''} B{o['block']} damp {o['damp']:g}")
        print(f"{k:>4} {desc:<44} {q_diff:>9} {grid_diff:>9} {'ok' if order_ok else 'DIFF':>10} "
              f"{'ok' if damp_ok else 'DIFF':>5} {e_t:10.6f} {e_r:10.6f}")
        if not (order_ok and damp_ok) or (dtype == torch.float64 and (q_diff or grid_diff or not deq_ok)):
            bad += 1
    print(f"{len(cases) - bad} passed, {bad} failed")
    sys.exit(1 if bad else 0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def quant_args(q):
        q.add_argument("--bits", type=int, default=4)
        q.add_argument("--group", type=int, default=128, help="0 = one group per row")
        q.add_argument("--act-order", action="store_true")
        q.add_argument("--sym", action="store_true")
        q.add_argument("--static-groups", action="store_true")
        q.add_argument("--mse", action="store_true")
        q.add_argument("--damp", type=float, default=0.01)
        q.add_argument("--block", type=int, default=128)
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    b = sub.add_parser("bench", help="time the per-layer GPTQ on random layers")
    quant_args(b)
    b.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    b.add_argument("--tokens", type=int, default=4096)
    b.add_argument("--hold-clock", type=float, default=0.5,
                   help="seconds of GPU load before the timed run (0: none)")
    b.add_argument("--json")
    m = sub.add_parser("model", help="GPTQ a Llama checkpoint block by block (timed), optionally "
                       "save it fake-quantized as dense f32")
    quant_args(m)
    m.add_argument("--model", required=True)
    m.add_argument("--calib-tokens", required=True)
    m.add_argument("--out", help="save the fake-quantized model here (dense f32); default: not saved")
    m.add_argument("--max-blocks", type=int, help="quantize blocks 0..N-1 only, then stop")
    m.add_argument("--forward-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the model and its decoder-layer forward (GPTQ stays f32)")
    m.add_argument("--hessian-dtype", default="float32", choices=["float32", "float64"],
                   help="dtype H is summed in (float64: how much f32 summation moves the result)")
    m.add_argument("--batch", type=int, default=1,
                   help="calibration sequences per decoder-layer call (memory for speed)")
    m.add_argument("--json", help="write block times, phase times and peak memory here")
    z = sub.add_parser("lazy16", help="effect of f16-rounded lazy-update operands on GPTQ (CPU)")
    quant_args(z)
    z.add_argument("--shapes", default="512x1024,1024x2048")
    z.add_argument("--tokens", type=int, default=4096)
    z.add_argument("--seeds", type=int, default=2)
    c = sub.add_parser("check", help="compare with the Rust reference's dump")
    c.add_argument("--dump", required=True)
    c.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    a = p.parse_args()
    if a.cmd in ("bench", "model", "lazy16"):
        a.group = a.group or None
        if not 2 <= a.bits <= 8:
            p.error("--bits must be in 2..8")
    if a.cmd == "model":
        if a.batch < 1:
            p.error("--batch must be at least 1")
        if a.max_blocks is not None and a.max_blocks < 1:
            p.error("--max-blocks must be at least 1")
    {"bench": cmd_bench, "model": cmd_model, "check": cmd_check, "lazy16": cmd_lazy16}[a.cmd](a)


if __name__ == "__main__":
    main()
