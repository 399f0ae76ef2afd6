// The quantizer grid of src/quant/grid.rs in WGSL, reproduced bit for bit; prepended to every
// kernel that quantizes (quant_rtn.wgsl, gptq.wgsl).
//
// Exactness: WGSL only promises 2.5 ulp for f32 division, while the host grid rounds the correctly
// rounded quotient. Both places where a quotient is rounded (the f16 scale and round(w / scale))
// therefore decide their rounding boundary exactly: the boundary value times the divisor is exact in
// f32 (few significant bits), and so is its difference to the dividend near the boundary (Sterbenz),
// so comparing against it gives the host's answer whatever the division's error. Fused or unfused
// multiply-add gives the same result because the products are exact.

const F16_MIN_NORMAL: f32 = 6.103515625e-5; // 2^-14
const F16_MAX: f32 = 65504.0;
const TWO_POW_M23: f32 = 1.1920928955078125e-7; // 2^-23

// a / b as WGSL computes it (within 2.5 ulp), moved by `skew` ulps when tests ask for it, to show
// that the rounding decisions below do not depend on the quotient being correctly rounded.
fn approx_div(a: f32, b: f32, skew: i32) -> f32 {
    let t = a / b;
    if (skew == 0 || t == 0.0) {
        return t;
    }
    return bitcast<f32>(bitcast<i32>(t) + skew);
}

// 2^e for the exponent of a normal x: the unit of its leading bit.
fn pow2_floor(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) & 0x7F800000u);
}

// The grid's scale: the f32 -> f16 round-to-nearest-even (by bitcast, not pack2x16float) of
// clamp(RN32(a / d), 2^-14, 65504) for a >= 0 and an integer divisor d <= 255, exactly as the host
// computes it. The f16 cell [lo, hi) of the approximate quotient has
// midpoint mid (12 significant bits), so mid * d is exact; RN32(a / d) equals mid exactly when
// |a - mid * d| <= d * ulp32(mid) / 2 (mid is even in f32, so ties of RN32 land on it), which is a
// tie of the f16 rounding; otherwise the sign of a - mid * d picks the side. An approximate quotient
// in a neighbouring cell still decides right: there the true value is far from that cell's midpoint.
fn grid_scale(a: f32, d: f32, skew: i32) -> f32 {
    let t = approx_div(a, d, skew);
    if (!(t < F16_MAX)) {
        return F16_MAX;
    }
    if (t < F16_MIN_NORMAL) {
        return F16_MIN_NORMAL;
    }
    let lo_bits = bitcast<u32>(t) & 0xFFFFE000u;
    let lo = bitcast<f32>(lo_bits);
    let hi = bitcast<f32>(lo_bits + 0x2000u);
    let mid = bitcast<f32>(lo_bits | 0x1000u);
    let diff = a - mid * d;
    let half = d * (pow2_floor(mid) * TWO_POW_M23) * 0.5;
    var r = lo;
    if (diff > half) {
        r = hi;
    } else if (diff >= -half && (lo_bits & 0x2000u) != 0u) {
        r = hi; // tie: keep the even f16 mantissa
    }
    // lo >= 2^-14 and hi <= 65504 already (t is inside that range); the clamp documents it.
    return clamp(r, F16_MIN_NORMAL, F16_MAX);
}

// round_ties_even(RN32(v / s)) for an f16-exact scale s >= 2^-14, as the host computes it. For
// |quotient| < 4096 the nearest half-integer m = k + 0.5 has at most 13 significant bits, so m * s
// (s has 11) is exact, and RN32(v / s) == m exactly when |v - m * s| <= s * ulp32(m) / 2 (m is even
// in f32): a tie, which goes to the even integer. Larger quotients are clamped by every caller.
fn round_div(v: f32, s: f32, skew: i32) -> f32 {
    let t = approx_div(v, s, skew);
    if (!(abs(t) < 4096.0)) {
        return round(t);
    }
    let k = floor(t);
    let m = k + 0.5;
    let diff = v - m * s;
    let half = s * (pow2_floor(m) * TWO_POW_M23) * 0.5;
    if (diff > half) {
        return k + 1.0;
    }
    if (diff < -half) {
        return k;
    }
    return select(k + 1.0, k, (i32(k) & 1) == 0);
}

struct Grid {
    scale: f32,
    zero: u32,
}

// QuantSpec::fit_minmax.
fn fit_minmax(mn: f32, mx: f32, maxq_u: u32, sym: bool, skew: i32) -> Grid {
    let maxq = f32(maxq_u);
    var lo = min(mn, 0.0);
    var hi = max(mx, 0.0);
    if (sym) {
        var amax = max(-lo, hi);
        if (amax == 0.0) {
            amax = 1.0;
        }
        return Grid(grid_scale(2.0 * amax, maxq, skew), (maxq_u + 1u) / 2u);
    }
    if (lo == 0.0 && hi == 0.0) {
        lo = -1.0;
        hi = 1.0;
    }
    let s = grid_scale(hi - lo, maxq, skew);
    let z = clamp(round_div(-lo, s, skew), 0.0, maxq);
    if (z == 0.0) {
        // GPTQ v1 stores zero - 1: keep zero >= 1 by spanning [0, hi] with maxq - 1 steps.
        return Grid(grid_scale(hi, maxq - 1.0, skew), 1u);
    }
    return Grid(s, u32(z));
}

fn quantize_one(v: f32, s: f32, z: u32, maxq: u32, skew: i32) -> u32 {
    return u32(clamp(round_div(v, s, skew) + f32(z), 0.0, f32(maxq)));
}

