//! Every WGSL source, embedded at build time and listed once so a device-free test validates them
//! all with naga (composed variants included).

pub const MATMUL: &str = include_str!("../shaders/matmul.wgsl");
pub const MATMUL_COOP: &str = include_str!("../shaders/matmul_coop.wgsl");
pub const SPLIT: &str = include_str!("../shaders/split.wgsl");
pub const REDUCE: &str = include_str!("../shaders/reduce.wgsl");
pub const QUANT_GRID: &str = include_str!("../shaders/quant_grid.wgsl");
pub const QUANT_RTN: &str = concat!(
    include_str!("../shaders/quant_grid.wgsl"),
    include_str!("../shaders/quant_rtn.wgsl")
);
pub const FORWARD: &str = include_str!("../shaders/forward.wgsl");
pub const STATS: &str = include_str!("../shaders/stats.wgsl");
pub const ELEMENTWISE: &str = include_str!("../shaders/elementwise.wgsl");
pub const MIRROR: &str = include_str!("../shaders/mirror.wgsl");
pub const TRANSPOSE: &str = include_str!("../shaders/transpose.wgsl");
pub const GPTQ: &str = include_str!("../shaders/gptq.wgsl");
pub const GPTQ_SG: &str = include_str!("../shaders/gptq_sg.wgsl");
pub const LINALG: &str = include_str!("../shaders/linalg.wgsl");
pub const PEAKS: &str = include_str!("../shaders/peaks.wgsl");
pub const ATTENTION_COOP: &str = include_str!("../shaders/attention_coop.wgsl");

/// Every module as the GPU will see it: (name, source, needs cooperative matrices).
pub fn all_modules() -> Vec<(String, String, bool)> {
    let mut v = crate::gpu::matmul::all_sources();
    v.push(("reduce.wgsl".into(), REDUCE.to_string(), false));
    v.push(("quant_rtn.wgsl".into(), QUANT_RTN.to_string(), false));
    v.push(("forward.wgsl".into(), FORWARD.to_string(), false));
    for d in [64, 80, 128] {
        let name = format!("forward.wgsl (attention, head dim {d})");
        v.push((name, crate::gpu::forward::attention_source(d), false));
    }
    for d in [32, 64, 128] {
        let name = format!("attention_coop.wgsl (head dim {d})");
        v.push((name, crate::gpu::forward::attention_f16_source(d), true));
    }
    v.push(("linalg.wgsl".into(), LINALG.to_string(), false));
    v.push(("peaks.wgsl".into(), PEAKS.to_string(), false));
    v.push(("mirror.wgsl".into(), MIRROR.to_string(), false));
    v.push(("transpose.wgsl".into(), TRANSPOSE.to_string(), false));
    v.extend(crate::gpu::gptq::all_sources());
    v.extend(crate::gpu::stats::all_sources());
    v
}
