//! Criterion benches of the GPU kernels on whatever adapter wgpu picks (WGPRESS_ADAPTER or
//! `--adapter` semantics). Shapes are small so the benches also finish on lavapipe; the large
//! shapes of BENCHMARKS.md come from `wgpress bench matmul` on the device.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wgpress::gpu::gptq::gptq_gpu;
use wgpress::gpu::matmul::{Layout, RegionProduct, matmul_into, region_product};
use wgpress::gpu::quant::rtn;
use wgpress::gpu::reduce::{ReduceOp, reduce_groups};
use wgpress::gpu::stats::HessianAccumulator;
use wgpress::gpu::{ContextOptions, GpuContext, GpuDtype, GpuTensor};
use wgpress::quant::QuantSpec;
use wgpress::quant::gptq::GptqOptions;
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
    // GPTQ's far lazy update as a split product (f32-accurate on the tensor cores), where the
    // adapter has cooperative matrices; its scratch is allocated per run, as `region_product`
    // does (`wgpress bench matmul --path split` times it with the scratch kept).
    let (sm, sn, sk) = (384, 256, 192);
    let ea = GpuTensor::from_f32(&ctx, sm, sk, &rng.normal_vec(sm * sk, 1.0)).unwrap();
    let eb = GpuTensor::from_f32(&ctx, sk, sn, &rng.normal_vec(sk * sn, 1.0)).unwrap();
    let ec = GpuTensor::from_f32(&ctx, sm, sn, &rng.normal_vec(sm * sn, 1.0)).unwrap();
    let split = RegionProduct {
        m: sm,
        n: sn,
        k: sk,
        a_off: 0,
        lda: sk,
        b_off: 0,
        ldb: sn,
        c_off: 0,
        ldc: sn,
        b_trans: false,
        alpha: -1.0,
        accumulate: true,
        split: true,
    };
    match region_product(&ctx, &ea, &eb, &ec, split) {
        Ok(()) => {
            g.throughput(Throughput::Elements((2 * sm * sn * sk) as u64));
            g.bench_function(format!("split_product_{sm}x{sn}x{sk}"), |bch| {
                bch.iter(|| {
                    region_product(&ctx, &ea, &eb, &ec, split).unwrap();
                    ctx.sync("split product", "bench").unwrap();
                })
            });
        }
        Err(e) => eprintln!("split product bench skipped: {e}"),
    }
    // One GPTQ layer (4-bit, group 128, act-order) on the Hessian of 2·cols calibration rows,
    // accumulated as the pipeline does.
    let (gr, gc, t) = (256, 384, 768);
    let x = GpuTensor::from_f32(&ctx, t, gc, &rng.normal_vec(t * gc, 1.0)).unwrap();
    let mut acc = HessianAccumulator::new(&ctx, gc).unwrap();
    acc.add(&ctx, &x).unwrap();
    let h = acc.finish(&ctx).unwrap();
    let lw = GpuTensor::from_f32(&ctx, gr, gc, &rng.normal_vec(gr * gc, 0.05)).unwrap();
    let opts = GptqOptions::new(spec);
    g.throughput(Throughput::Elements((gr * gc) as u64));
    g.bench_function(format!("gptq_4bit_g128_{gr}x{gc}"), |bch| {
        bch.iter(|| {
            let r = gptq_gpu(&ctx, &lw, &h, &opts).unwrap();
            ctx.sync("gptq", "bench").unwrap();
            r
        })
    });
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
