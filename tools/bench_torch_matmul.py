"""PyTorch baseline for `wgpress bench matmul`, run on the same GPU in the same device call.

Times C = A @ B (f32 with TF32 off, and f16) for the given cube sizes with CUDA events, after a
warm-up, rotating over several input pairs so repeated runs do not measure the cache.
Usage: python3 tools/bench_torch_matmul.py 4096 8192 [--iters 20]
"""
import argparse
import json
import sys

import torch


def bench(n, dtype, iters):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    pairs = [(torch.randn(n, n, device="cuda", dtype=dtype, generator=g),
              torch.randn(n, n, device="cuda", dtype=dtype, generator=g)) for _ in range(3)]
    for a, b in pairs:
        torch.matmul(a, b)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        a, b = pairs[i % len(pairs)]
        torch.matmul(a, b)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms": ms,
            "tflops": 2 * n ** 3 / (ms / 1e3) / 1e12}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes", type=int, nargs="+")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for dtype in (torch.float32, torch.float16):
        for n in args.sizes:
            r = bench(n, dtype, args.iters)
            rows.append(r)
            print(f"torch {r['dtype']:>8} {n:>6}^3 {r['ms']:9.3f} ms {r['tflops']:8.2f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
