// Splits one f32 operand of a split cooperative product (`matmul_coop.wgsl`, SPLIT) into scaled
// f16 halves, so that the product runs as one plain f16 product over three times the depth.
// Line l (a row of op(A), or a column of op(B)) of the source is element (l, t) at
// off + l * ls + t * ks for t < k. Each line gets the power-of-two exponent e that brings its
// largest magnitude into [2^13, 2^14) (clamped to +-60; 0 for a zero or non-finite largest), and
// each scaled element x = v 2^e is kept as hi, its top 11 significant bits cut with a mask
// (exact in f16 for x at or above 2^-14), and lo = f16(x - hi) (x - hi is exact in f32).
// Measured on the H200: hi = f16(x), lo = f16(x - f32(hi)) left lo zero (the driver folded the
// round trip away), hence the mask.
// The output is line-contiguous with leading dimension lp (the lines padded to the product's
// tile) and holds three segments of kp rows each (k padded to the slice depth): hi, hi, lo for
// op(A) (lo_seg = 2) and hi, lo, hi for op(B) (lo_seg = 1), so the one product over 3 kp
// positions sums hi·hi + hi·lo + lo·hi (lo·lo is dropped). Padding (lines at or past `lines`,
// positions at or past k) is written as zeros, so the product needs no bounds checks. After the
// segments, at e_off, each line's exponent as an f16 value (exact: |e| <= 60); the product's
// epilogue divides by 2^(e_row + e_col).
// This kernel must not round anything but lo: every other step is exact.
enable f16;

struct Params {
    lines: u32, k: u32, kp: u32, lp: u32,
    off: u32, ls: u32, ks: u32, lo_seg: u32,
    e_off: u32, pad0: u32, pad1: u32, pad2: u32,
}

@group(0) @binding(0) var<storage, read> SRC: array<f32>;
@group(0) @binding(1) var<storage, read_write> OUT: array<f16>;
@group(0) @binding(2) var<uniform> p: Params;

// The exponent that brings largest magnitude `m` into [2^13, 2^14), clamped to +-60; 0 for a
// zero or non-finite `m` (nothing to scale, or nothing that scaling could save).
fn scale_exp(m: f32) -> i32 {
    if (!(m > 0.0) || m > 3.0e38) {
        return 0;
    }
    return clamp(14 - frexp(m).exp, -60, 60);
}

// Each workgroup takes 32 lines, split along K into 8 parts of kp / 8 positions (kp is a
// multiple of 32): every invocation finds its part's largest magnitude, the workgroup combines
// the 8, then every invocation writes its part's halves. Consecutive invocations take
// consecutive lines, so the stores are contiguous, and so are the loads of a source that stores
// lines contiguously (ls = 1); a source that stores K contiguously is read a cache line at a
// time per invocation. The grid covers lp exactly (lp is a multiple of 32).
const LINES: u32 = 32u;
const PARTS: u32 = 8u;
var<workgroup> part_max: array<f32, 256>;

@compute @workgroup_size(32, 8, 1)
fn split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let l = wid.x * LINES + lid.x;
    let live = l < p.lines;
    let base = p.off + l * p.ls;
    let len = p.kp / PARTS;
    let t0 = lid.y * len;
    let t1 = t0 + len;
    var m = 0.0;
    if (live) {
        for (var t = t0; t < min(t1, p.k); t++) {
            m = max(m, abs(SRC[base + t * p.ks]));
        }
    }
    part_max[lid.y * LINES + lid.x] = m;
    workgroupBarrier();
    for (var j = 0u; j < PARTS; j++) {
        m = max(m, part_max[j * LINES + lid.x]);
    }
    let e = scale_exp(m);
    let f = ldexp(1.0, e);
    if (lid.y == 0u) {
        OUT[p.e_off + l] = f16(f32(e));
    }
    let lo_first = p.lo_seg == 1u;
    for (var t = t0; t < t1; t++) {
        var x = 0.0;
        if (live && t < p.k) {
            x = SRC[base + t * p.ks] * f;
        }
        let hi = bitcast<f32>(bitcast<u32>(x) & 0xffffe000u);
        let h = f16(hi);
        let lo = f16(x - hi);
        OUT[t * p.lp + l] = h;
        OUT[(p.kp + t) * p.lp + l] = select(h, lo, lo_first);
        OUT[(2u * p.kp + t) * p.lp + l] = select(lo, h, lo_first);
    }
}
