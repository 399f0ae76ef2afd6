//! The `wgpress` command line: parse, call the library, print. No algorithm lives here.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use wgpress::engine::Engine;
use wgpress::gpu::matmul::{CoopConfig, Layout, MatmulPath};
use wgpress::gpu::{ContextOptions, GpuDtype};
use wgpress::model::forward::Precision;

#[derive(Parser)]
#[command(
    name = "wgpress",
    version,
    about = "Compress Llama-family checkpoints on any GPU (wgpu/WGSL)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct GpuArgs {
    /// GPU adapter: index or name substring (see `wgpress inspect`); default: discrete > integrated
    /// > software. Also read from WGPRESS_ADAPTER.
    #[arg(long)]
    adapter: Option<String>,
    /// Run on the CPU reference path instead of a GPU.
    #[arg(long)]
    cpu: bool,
    /// Time every GPU kernel by family with timestamp queries and print the table when the command
    /// ends (each kernel then runs in its own pass: slower; for finding bottlenecks).
    #[arg(long)]
    profile: bool,
}

impl GpuArgs {
    fn engine(&self) -> Result<ProfiledEngine> {
        let opts = ContextOptions {
            adapter: self.adapter.clone(),
            dump_shaders: std::env::var_os(wgpress::gpu::DUMP_SHADERS_ENV).map(Into::into),
            ..Default::default()
        };
        let engine = Engine::new(&opts, self.cpu)?;
        if self.profile {
            match &engine {
                Engine::Gpu(ctx) => ctx.start_profiling()?,
                Engine::Cpu => bail!("--profile times GPU kernels; it cannot be used with --cpu"),
            }
        }
        Ok(ProfiledEngine(engine))
    }
}

/// The engine of one command; with `--profile`, prints the kernel time table to stderr when the
/// command ends (also after an error, so a failing run still shows where its time went).
struct ProfiledEngine(Engine);

impl std::ops::Deref for ProfiledEngine {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.0
    }
}

impl Drop for ProfiledEngine {
    fn drop(&mut self) {
        if let Engine::Gpu(ctx) = &self.0 {
            match ctx.take_profile() {
                Ok(Some(p)) => {
                    let peaks = match wgpress::gpu::peaks::cached(ctx) {
                        Ok((peaks, fresh)) => {
                            if fresh {
                                eprintln!("measured this adapter's floors (cached for later runs)");
                            }
                            Some(peaks)
                        }
                        Err(e) => {
                            eprintln!("profile: could not measure the adapter's floors: {e}");
                            None
                        }
                    };
                    eprintln!("\n{}", p.table(peaks.as_ref()))
                }
                Ok(None) => {}
                Err(e) => eprintln!("profile: {e}"),
            }
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a checkpoint's architecture, parameter count and tensors, and the GPU adapters found.
    Inspect {
        /// Hugging Face checkpoint directory (default: the small model in assets/).
        model: Option<PathBuf>,
    },
    /// Compress a checkpoint (default: the small model in assets/ into ./out).
    Compress(wgpress_cli::CompressArgs),
    /// Perplexity of a checkpoint on a text (the GPTQ papers' protocol: one token stream without
    /// BOS, non-overlapping windows, loss on every token but each window's first).
    Eval {
        /// Hugging Face checkpoint directory (default: the small model in assets/).
        model: Option<PathBuf>,
        /// Evaluation text (UTF-8).
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// Keep only the first N tokens of the text.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Sliding windows advancing by N tokens, each scoring only its last N (default: the
        /// window length, i.e. non-overlapping windows as in the GPTQ papers).
        #[arg(long)]
        stride: Option<usize>,
        /// The original checkpoint: also report mean KL divergence and top-1 agreement against it.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Precision of the GPU forward's linear layers.
        #[arg(long, value_enum, default_value = "f32")]
        precision: PrecisionArg,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Write the calibration windows `compress --calib` would use, as int32 `input_ids` [N, T] in
    /// a safetensors file, so an external reference (tools/gptq_torch.py) calibrates on the same
    /// tokens.
    CalibTokens {
        /// Hugging Face checkpoint directory (its tokenizer; default: the small model in assets/).
        model: Option<PathBuf>,
        #[arg(long = "calib", required = true)]
        calib: Vec<PathBuf>,
        #[arg(long, default_value_t = 128)]
        nsamples: usize,
        #[arg(long, default_value_t = 2048)]
        seqlen: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        bos: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a random-weight Hugging Face checkpoint of a named shape (for benchmarks at scale):
    /// bf16, sharded every ~2 GB, realistic weight scales with a few outlier input channels, and
    /// the tiny model's byte-level BPE tokenizer; generated on all cores, same bytes for a seed.
    Synth {
        /// tiny, smollm2-135m, llama-7b or llama-13b.
        #[arg(long)]
        shape: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number of decoder blocks instead of the shape's own (e.g. a 2-block llama-7b to
        /// profile one block's kernels quickly); every block keeps the shape's sizes.
        #[arg(long)]
        layers: Option<usize>,
    },
    /// Time a kernel on the chosen adapter.
    Bench {
        #[command(subcommand)]
        kernel: BenchKernel,
    },
}

#[derive(Subcommand)]
enum BenchKernel {
    /// C = A * op(B): prints ms and TFLOP/s per shape.
    Matmul {
        /// Problem sizes as M[xNxK]; a single number means a cube. Repeatable.
        #[arg(long = "size", default_values = ["1024", "2048", "4096"])]
        sizes: Vec<String>,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: BenchDtype,
        #[arg(long, value_enum, default_value = "nn")]
        layout: BenchLayout,
        /// Force a kernel; default picks the fastest eligible.
        #[arg(long, value_enum)]
        path: Option<BenchPath>,
        /// Time the cooperative kernel with these tile configurations (SGMxSGNxBUFFERS, e.g.
        /// 2x2x2, with an optional slice depth, e.g. 2x2x1k64, or `all` for every tuning
        /// candidate); repeatable.
        #[arg(long = "coop-config")]
        coop_configs: Vec<String>,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// Whole-model forward throughput (tokens/s) on random token ids, as `eval` runs it.
    Forward {
        /// Hugging Face checkpoint directory (default: the small model in assets/).
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        #[arg(long, default_value_t = 4)]
        windows: usize,
        /// Precision of the GPU forward's linear layers.
        #[arg(long, value_enum, default_value = "f32")]
        precision: PrecisionArg,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// GPTQ of one random layer: total time, each phase, FLOP/s and peak memory.
    Gptq {
        /// Output rows of the layer (use with --cols); or give --shape.
        #[arg(long)]
        rows: Option<usize>,
        #[arg(long)]
        cols: Option<usize>,
        /// Layer shapes as ROWSxCOLS, repeatable (e.g. 4096x4096 11008x4096).
        #[arg(long = "shape")]
        shapes: Vec<String>,
        #[arg(long, default_value_t = 4)]
        bits: u8,
        /// Group size; 0 means per output channel.
        #[arg(long, default_value_t = 128)]
        group: usize,
        #[arg(long)]
        sym: bool,
        #[arg(long)]
        no_act_order: bool,
        /// Calibration rows behind the random Hessian.
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Column-loop kernel: rows or subgroup (default: subgroup where the adapter has 32-wide
        /// subgroups, else rows).
        #[arg(long)]
        column_loop: Option<String>,
        /// Lazy-update kernel: tiled (f32) or split (far updates on the tensor cores,
        /// f32-accurate, where the adapter has cooperative matrices). Default: split where
        /// cooperative matrices run and its scratch fits within half the layer, else tiled.
        #[arg(long)]
        lazy: Option<String>,
        /// Positions per lazy-update span (rounded up to whole blocks): each block updates the
        /// rest of its span, each span's end every later column (default 1024).
        #[arg(long)]
        lazy_span: Option<usize>,
        /// Seconds of GPU load before each timed run, so it starts at the clock the adapter holds
        /// under load (0: none; software adapters never hold).
        #[arg(long, default_value_t = wgpress::gpu::peaks::HOLD_CLOCK_S)]
        hold_clock: f64,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        gpu: GpuArgs,
    },
    /// H = (2/n) XᵀX accumulation: ms and effective TFLOP/s (2·n·d² flops, the full product;
    /// only the lower triangle's tiles, about half, are computed).
    Hessian {
        #[arg(long, default_value_t = 65536)]
        tokens: usize,
        #[arg(long, default_value_t = 4096)]
        dim: usize,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: BenchDtype,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Also write the row as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        gpu: GpuArgs,
    },
}

/// Precision of the GPU forward's linear layers (`wgpress::model::forward::Precision`).
#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum PrecisionArg {
    /// Weights as stored times f32 activations: the reference numerics.
    F32,
    /// f16 weights times f16-rounded inputs, f32 accumulation: tensor cores on adapters with
    /// cooperative matrices (perplexity within 0.01% of f32 on the small model; an activation
    /// beyond f16's range is an error, a weight beyond it keeps that layer in f32).
    F16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::F16 => Precision::F16,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchDtype {
    F32,
    F16,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchLayout {
    Nn,
    Nt,
    Tn,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchPath {
    Tiled,
    Coop,
    /// GPTQ's far lazy update as a split product (C -= A·B, f32 operands, NN; f32-accurate on
    /// the tensor cores): needs --dtype f32 --layout nn.
    Split,
}

mod wgpress_cli {
    use super::{GpuArgs, PrecisionArg};
    use clap::{Args, ValueEnum};
    use std::path::PathBuf;

    #[derive(Args)]
    pub struct CompressArgs {
        /// Hugging Face checkpoint directory (default: the small model in assets/).
        pub model: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "rtn")]
        pub method: Method,
        /// Bits per weight (2..8; the GPTQ format takes 2, 3, 4 or 8).
        #[arg(long, default_value_t = 4)]
        pub bits: u8,
        /// Input columns per quantization group; 0 means one group per output channel.
        #[arg(long, default_value_t = 128)]
        pub group: usize,
        /// Symmetric grid (zero point fixed at the middle); default asymmetric.
        #[arg(long)]
        pub sym: bool,
        /// GPTQ: Hessian damping as a fraction of mean(diag H).
        #[arg(long, default_value_t = 0.01)]
        pub damp: f32,
        /// GPTQ: process columns in input order instead of by descending Hessian diagonal
        /// (act-order is on by default).
        #[arg(long)]
        pub no_act_order: bool,
        /// GPTQ: fit every group's grid before the column loop, on the original column order
        /// (g_idx stays c / group, which GGUF and some kernels need).
        #[arg(long)]
        pub static_groups: bool,
        /// GPTQ: fit grids by an MSE search over shrunk ranges instead of min-max.
        #[arg(long)]
        pub mse: bool,
        /// GPTQ: columns per lazy-update block (at most 128).
        #[arg(long, default_value_t = 128)]
        pub block: usize,
        #[arg(long, value_enum, default_value = "gptq")]
        pub format: Format,
        /// Dtype of unquantized tensors (GPTQ, compressed-tensors, GGUF matrices) or of all
        /// weights (dense).
        #[arg(long, value_enum, default_value = "f16")]
        pub dtype: OutDtype,
        /// Calibration text file(s); with them the layer-streaming pipeline runs on the GPU and
        /// reports each layer's output error on these activations.
        #[arg(long = "calib")]
        pub calib: Vec<PathBuf>,
        /// Calibration sequences (seeded random windows of the text).
        #[arg(long, default_value_t = 128)]
        pub nsamples: usize,
        /// Tokens per calibration sequence.
        #[arg(long, default_value_t = 2048)]
        pub seqlen: usize,
        #[arg(long, default_value_t = 0)]
        pub seed: u64,
        /// Start every calibration window with BOS (an attention-sink remedy).
        #[arg(long)]
        pub bos: bool,
        /// Precision of the calibration forward's linear layers (with --calib; under f16 the
        /// Hessians are accumulated from the f16-rounded layer inputs those layers multiply).
        #[arg(long, value_enum, default_value = "f32")]
        pub precision: PrecisionArg,
        /// Calibration tokens per forward batch (with --calib; rounded down to whole sequences,
        /// at least one). Smaller batches need less GPU memory for the block's intermediate
        /// activations; the calibration set itself stays on the GPU in f32.
        #[arg(long, default_value_t = wgpress::compress::DEFAULT_BATCH_TOKENS)]
        pub batch_tokens: usize,
        /// Output directory (written atomically; an earlier wgpress output there is replaced).
        #[arg(long, default_value = "out")]
        pub out: PathBuf,
        #[command(flatten)]
        pub gpu: GpuArgs,
    }

    #[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
    pub enum Method {
        /// Round to nearest (no calibration needed).
        Rtn,
        /// GPTQ (needs --calib): second-order error compensation on the GPU.
        Gptq,
    }

    #[derive(Clone, Copy, ValueEnum, Debug)]
    pub enum OutDtype {
        F16,
        Bf16,
        F32,
    }

    #[derive(Clone, Copy, ValueEnum, Debug)]
    pub enum Format {
        /// GPTQ v1 checkpoint (qweight/qzeros/scales/g_idx) for transformers, vLLM, GPTQModel.
        Gptq,
        /// Dequantized weights in the input's names (f16), for any runtime.
        Dense,
        /// compressed-tensors `pack-quantized` (vLLM, llm-compressor); bits 2, 4 or 8.
        CompressedTensors,
        /// GGUF v3 for llama.cpp: Q4_0 (--bits 4 --group 32 --sym), Q4_1 (--bits 4 --group 32)
        /// or Q8_0 (--bits 8 --group 32 --sym); --dtype sets the unquantized matrices' type.
        Gguf,
    }
}

/// The small model shipped in assets/: found next to the current directory or the source tree.
fn default_model() -> Result<PathBuf> {
    let rel = Path::new("assets/tiny");
    if rel.join("config.json").exists() {
        return Ok(rel.to_path_buf());
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny");
    if built.join("config.json").exists() {
        return Ok(built);
    }
    bail!(
        "no MODEL given and the default model assets/tiny was not found; pass a checkpoint directory"
    )
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { model } => {
            let dir = match model {
                Some(m) => m,
                None => default_model()?,
            };
            let report = wgpress::model::inspect(&dir)?;
            println!("{report}");
            let adapters = wgpress::gpu::list_adapters();
            println!("GPU adapters ({}):", adapters.len());
            if adapters.is_empty() {
                println!("  none (work runs on the CPU reference path)");
            }
            for a in adapters {
                println!("  {a}");
            }
            Ok(())
        }
        Cmd::Compress(args) => compress::run(args),
        Cmd::Eval {
            model,
            text,
            seq_len,
            max_tokens,
            stride,
            base,
            json,
            precision,
            gpu,
        } => {
            let dir = match model {
                Some(m) => m,
                None => default_model()?,
            };
            let model = wgpress::model::Model::open(&dir)?;
            let base = base.map(|b| wgpress::model::Model::open(&b)).transpose()?;
            let report = eval_cmd(
                &model,
                base.as_ref(),
                &text,
                (seq_len, stride.unwrap_or(seq_len)),
                max_tokens,
                precision.into(),
                &gpu,
            )?;
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            Ok(())
        }
        Cmd::CalibTokens {
            model,
            calib,
            nsamples,
            seqlen,
            seed,
            bos,
            out,
        } => {
            let dir = match model {
                Some(m) => m,
                None => default_model()?,
            };
            let m = wgpress::model::Model::open(&dir)
                .with_context(|| format!("opening {}", dir.display()))?;
            let tok = wgpress::model::tokenizer::Tokenizer::load(&m.dir, m.config.vocab_size)?;
            let opts = wgpress::calib::CalibOptions {
                files: calib,
                nsamples,
                seqlen,
                seed,
                bos,
            };
            let windows = wgpress::calib::sample_windows(&tok, &opts)?;
            let data: Vec<u8> = windows
                .iter()
                .flatten()
                .flat_map(|&t| (t as i32).to_le_bytes())
                .collect();
            let tmp = out.with_extension("tmp");
            wgpress::model::writer::write_safetensors(
                &tmp,
                &[wgpress::model::writer::TensorOut {
                    name: "input_ids".into(),
                    dtype: safetensors::Dtype::I32,
                    shape: vec![windows.len(), seqlen],
                    data,
                }],
                &Default::default(),
            )?;
            std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} x {seqlen} calibration tokens to {}",
                windows.len(),
                out.display()
            );
            Ok(())
        }
        Cmd::Synth {
            shape,
            out,
            seed,
            layers,
        } => {
            let mut spec = wgpress::model::synth::SynthSpec::named(&shape)?;
            if let Some(n) = layers {
                if n == 0 {
                    bail!("--layers must be at least 1");
                }
                spec.layers = n;
            }
            let t = std::time::Instant::now();
            wgpress::model::synth::write_random_llama(&out, &spec, seed)?;
            println!(
                "wrote a random {shape} checkpoint to {} in {:.1} s",
                out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Bench { kernel } => match kernel {
            BenchKernel::Matmul {
                sizes,
                dtype,
                layout,
                path,
                coop_configs,
                iters,
                json,
                gpu,
            } => {
                let mut configs: Vec<Option<CoopConfig>> = Vec::new();
                for c in &coop_configs {
                    if c == "all" {
                        configs.extend(CoopConfig::CANDIDATES.map(Some));
                    } else {
                        configs.push(Some(CoopConfig::parse(c)?));
                    }
                }
                if configs.is_empty() {
                    configs.push(None);
                }
                let engine = gpu.engine()?;
                let Some(ctx) = engine.gpu() else {
                    bail!("`bench` measures GPU kernels and needs an adapter")
                };
                println!("adapter: {}", engine.describe());
                let dtype = gpu_dtype(dtype);
                let layout = match layout {
                    BenchLayout::Nn => Layout::NN,
                    BenchLayout::Nt => Layout::NT,
                    BenchLayout::Tn => Layout::TN,
                };
                let split = matches!(path, Some(BenchPath::Split));
                if split
                    && (dtype != GpuDtype::F32 || layout != Layout::NN || !coop_configs.is_empty())
                {
                    bail!(
                        "--path split times C -= A·B on f32 operands: give --dtype f32 --layout nn and no --coop-config"
                    );
                }
                let path = path.and_then(|p| match p {
                    BenchPath::Tiled => Some(MatmulPath::Tiled),
                    BenchPath::Coop => Some(MatmulPath::Coop),
                    BenchPath::Split => None,
                });
                let mut rows = Vec::new();
                println!(
                    "{:>6} {:>6} {:>6} {:>5} {:>6} {:>6} {:>7} {:>10} {:>8}",
                    "m", "n", "k", "dtype", "layout", "path", "config", "ms", "TFLOP/s"
                );
                for s in &sizes {
                    let (m, n, k) = parse_size(s)?;
                    let bench = if split {
                        wgpress::bench::split_matmul(ctx, (m, n, k), iters).map(|r| vec![r])
                    } else {
                        wgpress::bench::matmul(ctx, (m, n, k), dtype, layout, path, &configs, iters)
                    }
                    .with_context(|| format!("matmul {s}"))?;
                    for r in bench {
                        println!(
                            "{:>6} {:>6} {:>6} {:>5} {:>6} {:>6} {:>7} {:>10.3} {:>8.2}",
                            r.m,
                            r.n,
                            r.k,
                            r.dtype,
                            r.layout,
                            r.path,
                            r.config.as_deref().unwrap_or("-"),
                            r.ms,
                            r.tflops
                        );
                        rows.push(r);
                    }
                }
                if let Some(p) = json {
                    std::fs::write(&p, serde_json::to_string_pretty(&rows)?)
                        .with_context(|| format!("writing {}", p.display()))?;
                }
                Ok(())
            }
            BenchKernel::Forward {
                model,
                seq_len,
                windows,
                precision,
                gpu,
            } => {
                let dir = match model {
                    Some(m) => m,
                    None => default_model()?,
                };
                let model = wgpress::model::Model::open(&dir)?;
                let engine = gpu.engine()?;
                let Some(ctx) = engine.gpu() else {
                    bail!("`bench` measures GPU kernels and needs an adapter")
                };
                println!("adapter: {}", engine.describe());
                let r = wgpress::bench::forward(ctx, &model, seq_len, windows, precision.into())?;
                println!(
                    "forward {}: seq {} x {} windows: {:.2} ms/window, {:.0} tokens/s",
                    dir.display(),
                    r.seq_len,
                    r.windows,
                    r.ms_per_window,
                    r.tokens_per_s
                );
                Ok(())
            }
            BenchKernel::Gptq {
                rows,
                cols,
                mut shapes,
                bits,
                group,
                sym,
                no_act_order,
                tokens,
                iters,
                column_loop,
                lazy,
                lazy_span,
                hold_clock,
                json,
                gpu,
            } => {
                let column_loop = column_loop
                    .as_deref()
                    .map(wgpress::gpu::gptq::ColumnLoop::parse)
                    .transpose()?;
                let lazy_path = lazy
                    .as_deref()
                    .map(wgpress::gpu::gptq::LazyPath::parse)
                    .transpose()?;
                match (rows, cols) {
                    (Some(r), Some(c)) => shapes.push(format!("{r}x{c}")),
                    (None, None) => {}
                    _ => bail!("--rows and --cols go together"),
                }
                if shapes.is_empty() {
                    shapes.push("4096x4096".into());
                }
                let spec =
                    wgpress::quant::QuantSpec::new(bits, (group != 0).then_some(group), sym)?;
                let opts = wgpress::bench::GptqBenchOptions {
                    spec,
                    act_order: !no_act_order,
                    tokens,
                    iters,
                    column_loop,
                    lazy_path,
                    lazy_span,
                    hold_clock,
                };
                let engine = gpu.engine()?;
                let Some(ctx) = engine.gpu() else {
                    bail!("`bench` measures GPU kernels and needs an adapter")
                };
                println!("adapter: {}", engine.describe());
                if hold_clock > 0.0 && !ctx.software {
                    println!("each timed run follows {hold_clock} s of GPU load (--hold-clock)");
                }
                if let Some(span) = lazy_span {
                    println!("lazy-update span: {span} positions (rounded up to whole blocks)");
                }
                println!(
                    "{:>12} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9}",
                    "shape",
                    "total ms",
                    "prep",
                    "chol",
                    "inverse",
                    "upload",
                    "loop",
                    "(block",
                    "lazy)",
                    "peak MiB"
                );
                let mut rows_out = Vec::new();
                for s in &shapes {
                    let (r, c) = s
                        .split_once('x')
                        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
                        .with_context(|| format!("shape `{s}`: expected ROWSxCOLS"))?;
                    let b = wgpress::bench::gptq(ctx, r, c, &opts)
                        .with_context(|| format!("gptq {s}"))?;
                    let p = &b.phases;
                    println!(
                        "{:>12} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>8.2} {:>9.1}",
                        s,
                        b.total_s * 1e3,
                        p.prepare_s * 1e3,
                        p.cholesky_s * 1e3,
                        p.inverse_s * 1e3,
                        p.upload_s * 1e3,
                        p.loop_s * 1e3,
                        b.block_only_s * 1e3,
                        b.lazy_only_s * 1e3,
                        b.peak_extra_bytes as f64 / 1048576.0
                    );
                    println!(
                        "{:>12} GFLOP/s: cholesky {:.0}, inverse {:.0}, block loop ({}) {:.0}, lazy updates ({}) {:.0}; download {:.2} ms; layer f32 {:.1} MiB + H {:.1} MiB",
                        "",
                        b.flops_cholesky / p.cholesky_s / 1e9,
                        b.flops_inverse / p.inverse_s / 1e9,
                        b.column_loop,
                        b.flops_block / b.block_only_s / 1e9,
                        b.lazy_path,
                        b.flops_lazy / b.lazy_only_s / 1e9,
                        p.download_s * 1e3,
                        b.layer_f32_bytes as f64 / 1048576.0,
                        b.hessian_bytes as f64 / 1048576.0
                    );
                    rows_out.push(b);
                }
                if let Some(p) = json {
                    std::fs::write(&p, serde_json::to_string_pretty(&rows_out)?)
                        .with_context(|| format!("writing {}", p.display()))?;
                }
                Ok(())
            }
            BenchKernel::Hessian {
                tokens,
                dim,
                dtype,
                iters,
                json,
                gpu,
            } => {
                let engine = gpu.engine()?;
                let Some(ctx) = engine.gpu() else {
                    bail!("`bench` measures GPU kernels and needs an adapter")
                };
                println!("adapter: {}", engine.describe());
                let r = wgpress::bench::hessian(ctx, tokens, dim, gpu_dtype(dtype), iters)
                    .with_context(|| format!("hessian {tokens}x{dim}"))?;
                println!(
                    "{:>8} {:>6} {:>5} {:>10} {:>8}",
                    "tokens", "dim", "dtype", "ms", "TFLOP/s"
                );
                println!(
                    "{:>8} {:>6} {:>5} {:>10.3} {:>8.2}",
                    r.tokens, r.dim, r.dtype, r.ms, r.tflops
                );
                if let Some(p) = json {
                    std::fs::write(&p, serde_json::to_string_pretty(&r)?)
                        .with_context(|| format!("writing {}", p.display()))?;
                }
                Ok(())
            }
        },
    }
}

fn gpu_dtype(d: BenchDtype) -> GpuDtype {
    match d {
        BenchDtype::F32 => GpuDtype::F32,
        BenchDtype::F16 => GpuDtype::F16,
        BenchDtype::Bf16 => GpuDtype::BF16,
    }
}

/// `--precision f16` picks the GPU forward's linear layers; on the CPU reference path (`--cpu`,
/// or no adapter) it would be silently ignored, so it is an error there.
fn require_gpu_for_precision(engine: &Engine, precision: Precision) -> Result<()> {
    if precision == Precision::F16 && engine.gpu().is_none() {
        bail!(
            "--precision f16 selects f16 linear layers in the GPU forward, but this run is on the CPU reference path ({}), which always computes in f32/f64: drop --precision f16 or run on a GPU",
            engine.describe()
        );
    }
    Ok(())
}

fn eval_cmd(
    model: &wgpress::model::Model,
    base: Option<&wgpress::model::Model>,
    text: &Path,
    (seq_len, stride): (usize, usize),
    max_tokens: Option<usize>,
    precision: Precision,
    gpu: &GpuArgs,
) -> Result<wgpress::eval::EvalReport> {
    let cfg = &model.config;
    if seq_len > cfg.max_position_embeddings {
        bail!(
            "--seq-len {seq_len} exceeds the model's max_position_embeddings ({})",
            cfg.max_position_embeddings
        );
    }
    let tok = wgpress::model::tokenizer::Tokenizer::load(&model.dir, cfg.vocab_size)?;
    let body = std::fs::read_to_string(text)
        .with_context(|| format!("reading evaluation text {}", text.display()))?;
    let ids = tok.encode(&body)?;
    let windows = wgpress::calib::stride_windows(&ids, seq_len, stride, max_tokens)
        .with_context(|| format!("evaluation text {}", text.display()))?;
    let engine = gpu.engine()?;
    eprintln!("device: {}", engine.describe());
    require_gpu_for_precision(&engine, precision)?;
    let bar = indicatif::ProgressBar::new(windows.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} windows (eta {eta}) {per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report =
        wgpress::eval::perplexity(&engine, model, base, &windows, precision, &|done, _| {
            bar.set_position(done as u64)
        })?;
    bar.finish_and_clear();
    println!(
        "{}: {} tokens of {} in {} windows of {}, {} scored",
        model.dir.display(),
        ids.len().min(max_tokens.unwrap_or(usize::MAX)),
        text.display(),
        report.windows,
        report.seq_len,
        report.scored_tokens
    );
    println!(
        "perplexity {:.4} (mean loss {:.6} nats) in {:.2} s, {:.0} tokens/s ({:?} linear layers)",
        report.ppl, report.mean_nll, report.seconds, report.tokens_per_s, report.precision
    );
    if let (Some(kl), Some(top1), Some(b)) = (report.kl, report.top1, base) {
        println!(
            "against {}: mean KL {:.6} nats/token, top-1 agreement {:.2}%",
            b.dir.display(),
            kl,
            top1 * 100.0
        );
    }
    Ok(report)
}

fn parse_size(s: &str) -> Result<(usize, usize, usize)> {
    let parts: Vec<usize> = s
        .split('x')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("size `{s}`: expected M or MxNxK"))?;
    match parts[..] {
        [c] => Ok((c, c, c)),
        [m, n, k] => Ok((m, n, k)),
        _ => bail!("size `{s}`: expected M or MxNxK"),
    }
}

mod compress {
    use super::wgpress_cli::{CompressArgs, Format, Method, OutDtype};
    use anyhow::{Context, Result};
    use indicatif::{ProgressBar, ProgressStyle};
    use wgpress::compress::{self, CompressOptions};
    use wgpress::model::safetensors::Dtype;
    use wgpress::quant::QuantSpec;
    use wgpress::quant::gptq::GptqOptions;

    pub fn run(args: CompressArgs) -> Result<()> {
        let dir = match args.model {
            Some(m) => m,
            None => super::default_model()?,
        };
        let spec = QuantSpec::new(args.bits, (args.group != 0).then_some(args.group), args.sym)?;
        let model = wgpress::model::Model::open(&dir)
            .with_context(|| format!("opening {}", dir.display()))?;
        let gptq = (args.method == Method::Gptq).then(|| {
            let mut g = GptqOptions::new(spec);
            g.damp = args.damp;
            g.act_order = !args.no_act_order;
            g.static_groups = args.static_groups;
            g.mse = args.mse;
            g.block = args.block;
            g
        });
        if let Some(g) = &gptq {
            if args.calib.is_empty() {
                anyhow::bail!(
                    "--method gptq needs calibration text: pass --calib FILE (e.g. a few MB of text like the model's training data)"
                );
            }
            if !(1..=wgpress::quant::gptq::MAX_BLOCK).contains(&g.block) {
                anyhow::bail!("--block must be in 1..={}", wgpress::quant::gptq::MAX_BLOCK);
            }
        }
        let engine = args.gpu.engine()?;
        eprintln!("device: {}", engine.describe());
        crate::require_gpu_for_precision(&engine, args.precision.into())?;
        let opts = CompressOptions {
            gptq,
            spec,
            format: match args.format {
                Format::Gptq => compress::Format::Gptq,
                Format::Dense => compress::Format::Dense,
                Format::CompressedTensors => compress::Format::CompressedTensors,
                Format::Gguf => compress::Format::Gguf,
            },
            dtype: match args.dtype {
                OutDtype::F16 => Dtype::F16,
                OutDtype::Bf16 => Dtype::BF16,
                OutDtype::F32 => Dtype::F32,
            },
            out: args.out.clone(),
            precision: args.precision.into(),
            batch_tokens: args.batch_tokens,
        };
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} tensors (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let report = if args.calib.is_empty() {
            compress::rtn(&engine, &model, &opts, &|done, total, name| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(name.to_string());
            })?
        } else {
            let calib = wgpress::calib::CalibOptions {
                files: args.calib.clone(),
                nsamples: args.nsamples,
                seqlen: args.seqlen,
                seed: args.seed,
                bos: args.bos,
            };
            let rtn = wgpress::pipeline::Rtn(spec);
            let gptq_method = gptq.map(wgpress::pipeline::Gptq);
            let method: &dyn wgpress::pipeline::LayerMethod = match &gptq_method {
                Some(g) => g,
                None => &rtn,
            };
            wgpress::pipeline::run(
                &engine,
                &model,
                method,
                &calib,
                &opts,
                &|stage, done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                    bar.set_message(stage.to_string());
                },
            )?
        };
        bar.finish_and_clear();
        let n = report.layers.len().max(1) as f64;
        let mean_err = report.layers.iter().map(|l| l.rel_weight_err).sum::<f64>() / n;
        let worst = report
            .layers
            .iter()
            .max_by(|a, b| a.rel_weight_err.total_cmp(&b.rel_weight_err));
        println!(
            "quantized {} linear layers with {} {}-bit {} {} ({} tensors copied) in {:.2} s",
            report.layers.len(),
            report.method.to_uppercase(),
            spec.bits,
            spec.group
                .map(|g| format!("group {g}"))
                .unwrap_or_else(|| "per-channel".into()),
            if spec.sym { "symmetric" } else { "asymmetric" },
            report.copied_tensors,
            report.seconds
        );
        println!("mean relative weight error ||W-Q||^2/||W||^2: {mean_err:.3e}");
        let out_errs: Vec<f64> = report
            .layers
            .iter()
            .filter_map(|l| l.rel_output_err)
            .collect();
        if !out_errs.is_empty() {
            println!(
                "mean relative output error ||XWᵀ-XQᵀ||^2/||XWᵀ||^2 on calibration inputs: {:.3e}",
                out_errs.iter().sum::<f64>() / out_errs.len() as f64
            );
        }
        if let Some(w) = worst {
            println!("worst layer: {} ({:.3e})", w.name, w.rel_weight_err);
        }
        println!(
            "size: {:.2} MiB -> {:.2} MiB; peak GPU buffers {:.2} MiB; peak host memory {}",
            report.input_bytes as f64 / 1048576.0,
            report.output_bytes as f64 / 1048576.0,
            report.peak_gpu_bytes as f64 / 1048576.0,
            report.peak_host_bytes.map_or("unknown".into(), |b| format!(
                "{:.2} MiB",
                b as f64 / 1048576.0
            ))
        );
        if let Some(c) = &report.calibration {
            println!(
                "phases (s, host clock): {} ({} sequences per batch)",
                c.phases.line(2),
                c.batch_sequences
            );
            if let Some(g) = &c.gpu_phases {
                println!("phases (s, GPU timeline): {}", g.line(2));
            }
        }
        println!(
            "wrote {:?} checkpoint to {} (report.json inside)",
            report.format,
            args.out.display()
        );
        Ok(())
    }
}
