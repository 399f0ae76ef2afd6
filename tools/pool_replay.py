#!/usr/bin/env python3
"""Replays a buffer-pool trace under several eviction policies (gpu::pool, BENCHMARKS.md session 7).

Record a trace with
    RUST_LOG=wgpress::gpu::pool=trace,wgpress::pipeline=info wgpress compress ... 2> trace.txt
then run `python3 tools/pool_replay.py trace.txt`. Every request (`take N reused` or `creating N`)
and release (`give N`) is replayed in order; a request that no held buffer of its exact size serves
first frees held buffers, chosen by the policy, until alive + held + new fits under the high-water
mark (which, as in gpu::pool, never rises because of held buffers). Prints buffers created (in
total and per block, from the pipeline's `block N done` lines) and bytes created.

Policies: largest (the pool before session 7), lru (least recently released: the pool now),
belady (the buffer whose size is requested again farthest in the future: an offline bound).
"""
import bisect
import collections
import sys


def events(path):
    out = []
    for line in open(path, errors="replace"):
        if "buffer pool: take " in line or "buffer pool: creating " in line:
            out.append(("take", int(line.split("buffer pool: ")[1].split()[1])))
        elif "buffer pool: give " in line:
            out.append(("give", int(line.split("buffer pool: give ")[1].split()[0])))
        elif "pipeline" in line and " done at " in line:
            out.append(("block", 0))
    return out


def replay(ev, policy):
    future = collections.defaultdict(list)
    for i, (k, b) in enumerate(ev):
        if k == "take":
            future[b].append(i)
    live, mark, seq = 0, 0, 0
    held = {}  # id -> (bytes, release order)
    created, created_bytes, per_block, at_block = 0, 0, [], 0
    for i, (k, b) in enumerate(ev):
        if k == "block":
            per_block.append(created - at_block)
            at_block = created
            continue
        if k == "give":
            live -= b
            seq += 1
            held[seq] = (b, seq)
            continue
        same = [h for h, (s, _) in held.items() if s == b]
        if same:
            del held[max(same, key=lambda h: held[h][1])]
            live += b
            continue
        total = sum(s for s, _ in held.values())
        while held and live + total + b > mark:
            if policy == "largest":
                h = max(held, key=lambda h: held[h][0])
            elif policy == "lru":
                h = min(held, key=lambda h: held[h][1])
            else:
                def next_use(h):
                    uses = future[held[h][0]]
                    j = bisect.bisect_right(uses, i)
                    return uses[j] if j < len(uses) else float("inf")
                h = max(held, key=next_use)
            total -= held.pop(h)[0]
        created += 1
        created_bytes += b
        live += b
        mark = max(mark, live + total)
    return created, created_bytes, mark, per_block


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    ev = events(sys.argv[1])
    if not any(k == "take" for k, _ in ev):
        sys.exit(f"{sys.argv[1]}: no buffer-pool trace lines (RUST_LOG=wgpress::gpu::pool=trace)")
    for policy in ("largest", "lru", "belady"):
        c, cb, mark, per = replay(ev, policy)
        print(f"{policy:8} created {c:6} ({cb / 1e9:7.1f} GB), mark {mark / 2**20:8.0f} MiB, per block {per}")


if __name__ == "__main__":
    main()
