// In-place elementwise maps of an f32 buffer range: y = s * y (op 0) or y = sqrt(y) (op 1).
// One invocation per element over a 2-D grid of 256-wide workgroups (so more than 65535
// workgroups fit in one dispatch); range and factor come from the uniform.

struct Params {
    len: u32,   // elements in this dispatch
    off: u32,   // element offset of the first one in the bound chunk
    op: u32,
    s: f32,
}

@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<uniform> p: Params;

@compute @workgroup_size(256)
fn apply(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i >= p.len) { return; }
    let j = p.off + i;
    if (p.op == 1u) {
        y[j] = sqrt(y[j]);
    } else {
        y[j] = p.s * y[j];
    }
}
