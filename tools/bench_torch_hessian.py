"""PyTorch baseline for `wgpress bench hessian`, run on the same GPU in the same device call.

Times H = (2/n) * X.T @ X for X of TOKENS x DIM (default 262144 x 4096) with CUDA events after a
warm-up, TF32 off (so f32 is true f32, as in the WGSL kernel). f32 input; with --dtype f16/bf16
the stored X is 16-bit and is converted with .float() before the f32 product (what wgpress does
on load), and the conversion is inside the timed region. TFLOP/s counts 2*n*d^2 flops (the full
product), the same count `wgpress bench hessian` reports.
Usage: python3 tools/bench_torch_hessian.py [--tokens 262144] [--dim 4096] [--dtype f32] [--iters 10]
"""
import argparse
import json
import sys

import torch


def bench(n, d, dtype, iters):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", dtype=torch.float32, generator=g).to(dtype)
    scale = 2.0 / n

    def step():
        xf = x if dtype == torch.float32 else x.float()
        return torch.matmul(xf.T, xf).mul_(scale)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    return {"tokens": n, "dim": d, "dtype": str(dtype).replace("torch.", ""), "ms": ms,
            "tflops": 2 * n * d * d / (ms / 1e3) / 1e12}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], nargs="+", default=["f32"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    rows = []
    for name in args.dtype:
        r = bench(args.tokens, args.dim, dtypes[name], args.iters)
        rows.append(r)
        print(f"torch hessian {r['dtype']:>8} {r['tokens']}x{r['dim']} {r['ms']:9.3f} ms "
              f"{r['tflops']:8.2f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
