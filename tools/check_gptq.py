#!/usr/bin/env python3
"""External check of a wgpress GPTQ v1 export (DESIGN.md section 5).

Reads a GPTQ checkpoint directory with the `safetensors` package (numpy framework) and numpy only,
unpacks qweight/qzeros (2, 3, 4, 8 bits) and dequantizes by the published v1 rules, independently
of the Rust code:

    qweight int32 [in*b/32, out]: per output column, a little-endian bit stream along the input dim
        (value i at stream bits i*b .. i*b+b, stream bit p = bit p%32 of word p//32; for 3 bits
        32 values span 3 words, as AutoGPTQ packs them)
    qzeros  int32 [G, out*b/32]: the same stream along the output dim, storing zero - 1
    w[o, i] = scales[g_idx[i], o] * (q[o, i] - (qzeros[g_idx[i], o] + 1))   (f32 arithmetic)

then compares every quantized linear weight `<prefix>.weight` with the same tensor of a dense export
directory (written by wgpress from the same compressed model). With a dense f32 export the max abs
difference must be exactly 0; with a dense f16 export, the dense value must be our value rounded to
f16. Non-quantized tensors must agree within f16/bf16 rounding. Prints a table; exits 1 on any
mismatch, 2 on a malformed directory.

Usage: check_gptq.py GPTQ_DIR DENSE_DIR
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def load_dir(d):
    """All tensors of a checkpoint directory (single file or sharded with an index)."""
    single = os.path.join(d, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        out.update(load_file(os.path.join(d, name)))
    return out


def unpack_streams(words, n_values, bits):
    """words uint32 [n_streams, n_words] -> values [n_streams, n_values] of `bits` bits each."""
    words = np.ascontiguousarray(words.astype("<u4"))
    n_streams = words.shape[0]
    if words.shape[1] * 32 != n_values * bits:
        raise ValueError(f"{words.shape[1]} words cannot hold {n_values} values of {bits} bits")
    bitstream = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    bitstream = bitstream.reshape(n_streams, n_values, bits).astype(np.uint32)
    weights = (1 << np.arange(bits, dtype=np.uint32))[None, None, :]
    return (bitstream * weights).sum(axis=2).astype(np.uint32)


def dequantize(t, prefix, bits, sym, problems):
    qweight = t[prefix + ".qweight"].view(np.uint32)  # [in*b/32, out]
    qzeros = t[prefix + ".qzeros"].view(np.uint32)  # [G, out*b/32]
    scales = t[prefix + ".scales"]  # f16 [G, out]
    g_idx = t[prefix + ".g_idx"].astype(np.int64)  # [in]
    if scales.dtype != np.float16:
        problems.append(f"{prefix}.scales is {scales.dtype}, not float16")
    n_out = qweight.shape[1]
    n_in = qweight.shape[0] * 32 // bits
    n_groups = scales.shape[0]
    if g_idx.shape != (n_in,) or scales.shape != (n_groups, n_out):
        raise ValueError(f"{prefix}: inconsistent shapes {qweight.shape} {scales.shape} {g_idx.shape}")
    if qzeros.shape != (n_groups, n_out * bits // 32):
        raise ValueError(f"{prefix}: qzeros shape {qzeros.shape}")
    if g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise ValueError(f"{prefix}: g_idx out of range 0..{n_groups}")
    q = unpack_streams(qweight.T, n_in, bits)  # [out, in]
    zeros = unpack_streams(qzeros, n_out, bits) + 1  # [G, out], the v1 rule: no wrap-around
    if sym and not np.all(zeros == (1 << (bits - 1))):
        problems.append(f"{prefix}: sym=true but zero points differ from {1 << (bits - 1)}")
    if np.any(zeros > (1 << bits) - 1):
        problems.append(f"{prefix}: a stored zero of maxq means zero {1 << bits} to v1 runtimes")
    s = scales.astype(np.float32)[g_idx, :].T  # [out, in]
    z = zeros[g_idx, :].T.astype(np.float32)
    return s * (q.astype(np.float32) - z)


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    gdir, ddir = sys.argv[1], sys.argv[2]
    try:
        with open(os.path.join(gdir, "quantize_config.json")) as f:
            qc = json.load(f)
        with open(os.path.join(gdir, "config.json")) as f:
            cfg = json.load(f)
        gptq = load_dir(gdir)
        dense = load_dir(ddir)
    except (OSError, ValueError, KeyError) as e:
        print(f"cannot read the checkpoints: {e}")
        return 2
    problems = []
    bits, sym = int(qc["bits"]), bool(qc["sym"])
    for key in ("quant_method", "checkpoint_format", "bits", "group_size", "desc_act", "sym"):
        if cfg.get("quantization_config", {}).get(key) != qc.get(key):
            problems.append(f"config.json quantization_config.{key} != quantize_config.json")
    if qc.get("quant_method") != "gptq" or qc.get("checkpoint_format") != "gptq":
        problems.append("quant_method/checkpoint_format are not gptq")

    prefixes = sorted(n[: -len(".qweight")] for n in gptq if n.endswith(".qweight"))
    packed_suffixes = (".qweight", ".qzeros", ".scales", ".g_idx")
    rows = []
    for p in prefixes:
        try:
            w = dequantize(gptq, p, bits, sym, problems)
        except ValueError as e:
            print(f"malformed tensor: {e}")
            return 2
        name = p + ".weight"
        if name not in dense:
            rows.append((name, w.shape, "missing in dense", float("inf"), False))
            continue
        d = dense[name]
        if d.shape != w.shape:
            rows.append((name, w.shape, f"dense shape {d.shape}", float("inf"), False))
            continue
        if d.dtype == np.float32:
            diff = float(np.max(np.abs(d - w))) if w.size else 0.0
            ok = diff == 0.0
        else:
            # The dense value must be ours rounded to its dtype (f16 rounding, nothing more).
            diff = float(np.max(np.abs(d.astype(np.float32) - w))) if w.size else 0.0
            ok = bool(np.array_equal(w.astype(d.dtype), d))
        rows.append((name, w.shape, f"{bits}-bit G={gptq[p + '.scales'].shape[0]}", diff, ok))
    for n in sorted(gptq):
        if n.endswith(packed_suffixes):
            continue
        a = gptq[n].astype(np.float32)
        if n not in dense:
            rows.append((n, a.shape, "missing in dense", float("inf"), False))
            continue
        b = dense[n].astype(np.float32)
        if a.shape != b.shape:
            rows.append((n, a.shape, f"dense shape {b.shape}", float("inf"), False))
            continue
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        # Half an f16 ulp of the dense value (also covers bf16-vs-bf16 and f16-vs-f16 equality).
        tol = np.abs(b) * 2.0**-11 + 2.0**-25
        ok = bool(np.all(np.abs(a - b) <= tol)) or gptq[n].dtype == dense[n].dtype and diff == 0.0
        rows.append((n, a.shape, str(gptq[n].dtype), diff, ok))
    if not prefixes:
        problems.append("no quantized tensors (*.qweight) found")

    width = max([len(r[0]) for r in rows] + [6])
    print(f"{'tensor':<{width}}  {'shape':<14} {'kind':<16} {'max|diff|':>12}  ok")
    for name, shape, kind, diff, ok in rows:
        print(f"{name:<{width}}  {str(tuple(shape)):<14} {kind:<16} {diff:>12.3g}  {'yes' if ok else 'NO'}")
    for p in problems:
        print(f"problem: {p}")
    bad = sum(not r[4] for r in rows)
    print(f"{len(rows)} tensors, {bad} mismatched, {len(problems)} problems")
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main())
