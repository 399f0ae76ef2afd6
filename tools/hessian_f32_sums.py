"""How much of XᵀX's small directions survive f32 accumulation, by summation length (numpy, CPU).

A synthetic X in the shape of a deep Llama block's inputs: every token near one common vector v0
(|v0| 100x the spread), and the first token of each 512-token window 30x larger (the
"massive activation" tokens). XᵀX is summed in f32 three ways and compared with the f64 product
in the subspace orthogonal to the dominant direction, which is where GPTQ's error compensation
works: one sequential sum over all tokens (as one long GPU dispatch accumulates), and sums of
512 and of 64 tokens added together (as per-batch accumulation does).

    python3 tools/hessian_f32_sums.py [--tokens 8192] [--dim 64]
"""
import argparse

import numpy as np


def seq32(x):
    h = np.zeros((x.shape[1], x.shape[1]), np.float32)
    for row in x:
        h += np.outer(row, row).astype(np.float32)
    return h


def blocked(x, b):
    h = np.zeros((x.shape[1], x.shape[1]), np.float32)
    for s in range(0, x.shape[0], b):
        h += seq32(x[s:s + b])
    return h


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=64)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    v0 = rng.normal(size=a.dim) * 30
    x = (v0[None, :] + rng.normal(size=(a.tokens, a.dim)) * 0.3).astype(np.float32)
    x[::512] *= 30
    h64 = x.astype(np.float64).T @ x.astype(np.float64)
    _, vecs = np.linalg.eigh(h64)
    p = vecs[:, :-1]
    ref = np.linalg.norm(p.T @ h64 @ p)

    def err(h):
        return np.linalg.norm(p.T @ (h.astype(np.float64) - h64) @ p) / ref

    print(f"sequential f32 sum of {a.tokens} tokens: {err(seq32(x)):.3e}")
    for b in (512, 64):
        print(f"f32 sums of {b} tokens, added:      {err(blocked(x, b)):.3e}")


if __name__ == "__main__":
    main()
