// Adapter floors for `--profile` (src/gpu/peaks.rs): fma_peak runs `iters` rounds of eight
// independent FMA chains per invocation (16 FLOPs a round) and stores their sum, so the compiler
// cannot drop the work; the rate it reaches is the adapter's practical f32 FMA throughput.

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
    var a0 = f32(id);
    var a1 = a0 + 1.0;
    var a2 = a0 + 2.0;
    var a3 = a0 + 3.0;
    var a4 = a0 + 4.0;
    var a5 = a0 + 5.0;
    var a6 = a0 + 6.0;
    var a7 = a0 + 7.0;
    for (var i = 0u; i < pk.iters; i++) {
        a0 = fma(a0, x, y);
        a1 = fma(a1, x, y);
        a2 = fma(a2, x, y);
        a3 = fma(a3, x, y);
        a4 = fma(a4, x, y);
        a5 = fma(a5, x, y);
        a6 = fma(a6, x, y);
        a7 = fma(a7, x, y);
    }
    pk_out[id] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}
