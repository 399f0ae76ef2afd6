//! Criterion benches of the GPU kernels on whatever adapter wgpu picks (WGPRESS_ADAPTER or
//! `--adapter` semantics). Shapes are small so the benches also finish on lavapipe; the large
//! shapes of BENCHMARKS.md come from `wgpress bench matmul` on the device.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wgpress::gpu::matmul::{Layout, matmul_into};
use wgpress::gpu::quant::rtn;
use wgpress::gpu::reduce::{ReduceOp, reduce_groups};
use wgpress::gpu::{ContextOptions, GpuContext, GpuDtype, GpuTensor};
use wgpress::quant::QuantSpec;
use wgpress::rng::Rng;

fn kernels(c: &mut Criterion) {
    let ctx = match GpuContext::new(&ContextOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("no GPU adapter, kernel benches skipped: {e}");
            return;
        }
    };
    let mut rng = Rng::new(1);
    let (m, n, k) = (384, 320, 448);
    let a = GpuTensor::from_f32(&ctx, m, k, &rng.normal_vec(m * k, 1.0)).unwrap();
    let b = GpuTensor::from_f32(&ctx, k, n, &rng.normal_vec(k * n, 1.0)).unwrap();
    let out = GpuTensor::empty(&ctx, m, n, GpuDtype::F32).unwrap();
    let mut g = c.benchmark_group("gpu");
    g.sample_size(10);
    g.throughput(Throughput::Elements((2 * m * n * k) as u64));
    g.bench_function(format!("matmul_f32_{m}x{n}x{k}"), |bch| {
        bch.iter(|| {
            matmul_into(&ctx, &a, &b, Layout::NN, &out, false, None).unwrap();
            ctx.sync("matmul", "bench").unwrap();
        })
    });
    let (rows, cols) = (768, 512);
    let w = GpuTensor::from_f32(&ctx, rows, cols, &rng.normal_vec(rows * cols, 0.05)).unwrap();
    g.throughput(Throughput::Elements((rows * cols) as u64));
    g.bench_function(format!("absmax_g128_{rows}x{cols}"), |bch| {
        bch.iter(|| {
            let r = reduce_groups(&ctx, &w, 128, ReduceOp::AbsMax).unwrap();
            ctx.sync("reduce", "bench").unwrap();
            r
        })
    });
    let spec = QuantSpec::new(4, Some(128), false).unwrap();
    g.bench_function(format!("rtn_4bit_g128_{rows}x{cols}"), |bch| {
        bch.iter(|| rtn(&ctx, &w, &spec).unwrap())
    });
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
