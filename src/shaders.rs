//! Every WGSL source, embedded at build time, listed once so a test can validate them all with naga.

pub const MATMUL: &str = include_str!("../shaders/matmul.wgsl");
pub const MATMUL_COOP: &str = include_str!("../shaders/matmul_coop.wgsl");
pub const REDUCE: &str = include_str!("../shaders/reduce.wgsl");
pub const QUANT_RTN: &str = include_str!("../shaders/quant_rtn.wgsl");

/// (name, source, needs cooperative matrices)
pub const ALL: &[(&str, &str, bool)] = &[
    ("matmul.wgsl", MATMUL, false),
    ("matmul_coop.wgsl", MATMUL_COOP, true),
    ("reduce.wgsl", REDUCE, false),
    ("quant_rtn.wgsl", QUANT_RTN, false),
];
