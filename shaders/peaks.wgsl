// Adapter floors for `--profile` (src/gpu/peaks.rs): fma_peak runs `iters` rounds of sixteen
// independent FMA chains per invocation, written out twice per loop trip (64 FLOPs a round, so the
// loop's own instructions cost little issue bandwidth; one copy per trip measured 36 instead of 45
// TFLOP/s on an H200), and stores their sum, so the compiler cannot drop
// the work; copy_peak streams one buffer into another with 16-byte loads and stores.

struct PeakParams {
    iters: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> pk_out: array<f32>;
@group(0) @binding(1) var<uniform> pk: PeakParams;

@compute @workgroup_size(256)
fn fma_peak(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let id = gid.x + gid.y * nwg.x * 256u;
    let x = 0.999 + f32(id & 7u) * 1e-6;
    let y = 1e-3;
    var a0 = f32(id) + 0.0;
    var a1 = f32(id) + 1.0;
    var a2 = f32(id) + 2.0;
    var a3 = f32(id) + 3.0;
    var a4 = f32(id) + 4.0;
    var a5 = f32(id) + 5.0;
    var a6 = f32(id) + 6.0;
    var a7 = f32(id) + 7.0;
    var a8 = f32(id) + 8.0;
    var a9 = f32(id) + 9.0;
    var a10 = f32(id) + 10.0;
    var a11 = f32(id) + 11.0;
    var a12 = f32(id) + 12.0;
    var a13 = f32(id) + 13.0;
    var a14 = f32(id) + 14.0;
    var a15 = f32(id) + 15.0;
    for (var i = 0u; i < pk.iters; i++) {
        a0 = fma(a0, x, y);
        a1 = fma(a1, x, y);
        a2 = fma(a2, x, y);
        a3 = fma(a3, x, y);
        a4 = fma(a4, x, y);
        a5 = fma(a5, x, y);
        a6 = fma(a6, x, y);
        a7 = fma(a7, x, y);
        a8 = fma(a8, x, y);
        a9 = fma(a9, x, y);
        a10 = fma(a10, x, y);
        a11 = fma(a11, x, y);
        a12 = fma(a12, x, y);
        a13 = fma(a13, x, y);
        a14 = fma(a14, x, y);
        a15 = fma(a15, x, y);
        a0 = fma(a0, x, y);
        a1 = fma(a1, x, y);
        a2 = fma(a2, x, y);
        a3 = fma(a3, x, y);
        a4 = fma(a4, x, y);
        a5 = fma(a5, x, y);
        a6 = fma(a6, x, y);
        a7 = fma(a7, x, y);
        a8 = fma(a8, x, y);
        a9 = fma(a9, x, y);
        a10 = fma(a10, x, y);
        a11 = fma(a11, x, y);
        a12 = fma(a12, x, y);
        a13 = fma(a13, x, y);
        a14 = fma(a14, x, y);
        a15 = fma(a15, x, y);
    }
    pk_out[id] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15;
}

@group(0) @binding(0) var<storage, read_write> cp_dst: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> cp_src: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> cp: PeakParams; // iters: vec4 elements

@compute @workgroup_size(256)
fn copy_peak(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let stride = nwg.x * 256u;
    for (var e = gid.x; e < cp.iters; e += stride) {
        cp_dst[e] = cp_src[e];
    }
}
