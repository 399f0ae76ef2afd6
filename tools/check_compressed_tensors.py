#!/usr/bin/env python3
"""Checks a wgpress compressed-tensors `pack-quantized` export with the compressed-tensors package.

    python3 tools/check_compressed_tensors.py CT_DIR DENSE_DIR

CT_DIR is `wgpress compress --format compressed-tensors`; DENSE_DIR is a dense f32 export of the
same model and grid (`--format dense --dtype f32`), i.e. our dequantized weights. For every quantized
linear, the package's own decompressor (PackedQuantizationCompressor.decompress with the scheme
built from config.json's config group) must reproduce our weights bit for bit *after* rounding them
to the scale dtype: the package dequantizes in that dtype (f16), while our f32 value is the exact
product (an f16 scale times an integer below 2^8). Every other tensor must equal the dense one
rounded to its stored dtype. Prints one line per problem and a summary
"N tensors checked, M mismatched, P problems"; exits 1 on any mismatch or problem.

Needs: torch, safetensors, compressed-tensors (tested with 0.20.1).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import compressed_tensors
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    ct_dir, dense_dir = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = json.loads((ct_dir / "config.json").read_text())
    qc = cfg["quantization_config"]
    problems = []
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
        problems.append(f"quantization_config is not compressed-tensors pack-quantized: {qc}")
    if qc.get("quantization_status") != "compressed":
        problems.append(f"quantization_status {qc.get('quantization_status')!r}")
    (gname, group), = qc["config_groups"].items()
    # The package validates the scheme (it rejects e.g. actorder "group" or a bad group size).
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    ct = load_file(str(ct_dir / "model.safetensors"))
    dense = load_file(str(dense_dir / "model.safetensors"))
    prefixes = sorted(k[: -len(".weight_packed")] for k in ct if k.endswith(".weight_packed"))
    owned = set()
    checked = mismatched = 0
    for p in prefixes:
        sd = {k[len(p) + 1:]: v for k, v in ct.items() if k.startswith(p + ".") and k[len(p) + 1:].startswith("weight_")}
        owned.update(f"{p}.{k}" for k in sd)
        out = PackedQuantizationCompressor.decompress(sd, scheme)
        w = out["weight"]
        ref = dense.get(p + ".weight")
        checked += 1
        if ref is None:
            problems.append(f"{p}.weight missing from the dense reference")
            continue
        if tuple(w.shape) != tuple(ref.shape):
            problems.append(f"{p}: shape {tuple(w.shape)} vs dense {tuple(ref.shape)}")
            continue
        want = ref.to(torch.float32).to(w.dtype)
        if not torch.equal(w, want):
            bad = (w != want).sum().item()
            diff = (w.float() - want.float()).abs().max().item()
            print(f"MISMATCH {p}: {bad} of {w.numel()} values differ (max |diff| {diff:.3e})")
            mismatched += 1
    for k, v in ct.items():
        if k in owned:
            continue
        checked += 1
        ref = dense.get(k)
        if ref is None:
            problems.append(f"{k} missing from the dense reference")
            continue
        if not torch.equal(v, ref.to(torch.float32).to(v.dtype)):
            print(f"MISMATCH {k}: differs from the dense tensor rounded to {v.dtype}")
            mismatched += 1
    for k in dense:
        if k.endswith(".weight") and k[: -len(".weight")] in prefixes:
            continue
        if k not in ct:
            problems.append(f"{k} in the dense reference but not in the export")
    for p in problems:
        print("PROBLEM", p)
    print(
        f"compressed-tensors {compressed_tensors.__version__}, scheme {gname}: "
        f"{len(prefixes)} quantized linears; {checked} tensors checked, {mismatched} mismatched, {len(problems)} problems"
    )
    return 1 if mismatched or problems else 0


if __name__ == "__main__":
    sys.exit(main())
