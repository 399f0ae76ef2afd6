//! Matrix multiply on the GPU: C = [C +] A * B, A * B^T or A^T * B with f32 accumulation, for f32 inputs and
//! f16/bf16-stored inputs (converted on load). Two kernels with one interface, so both run every
//! shape, layout and chunking through the same walk below: the register-tiled f32 one (every
//! adapter) and a cooperative-matrix one (tensor cores: inputs rounded to f16, f32 accumulation)
//! on adapters with 16x16x16 f16 -> f32 cooperative matrices and 32-wide subgroups. The
//! cooperative kernel is picked automatically only when both operands are stored as f16 (so the
//! rounding loses nothing); bf16 or f32 operands take it only when the caller asks
//! (`MatmulPath::Coop`), having checked that f16's range and precision suffice.
//! The CPU reference is `reference::matmul`.
//!
//! Chunked operands: A and C are walked in row ranges that lie inside one chunk of each; B's
//! chunks split K (layout NN, accumulated pass by pass) or N (layout NT, a column range of C).
//! Layout TN (A stored k x m, so both operands are chunked along K, as X in XᵀX is by tokens)
//! walks the K ranges common to A's and B's chunks, accumulating pass by pass, and for each one
//! every chunk of C (a row range of C = a column range of A).
//!
//! Large f16 products in layouts NN and NT (A k-contiguous; B too in NT, as in x·Wᵀ) run as
//! transposes (`shaders/transpose.wgsl`) and a TN product, the cooperative kernel's fastest
//! orientation ([`as_tn_pays`], [`matmul_via_tn`]).

use super::buffer::{GpuDtype, GpuTensor};
use super::context::{Dispatch, GpuContext};
use crate::error::{Error, Result};
use crate::shaders;

/// How A and B are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A is m x k, B is k x n, both row-major: C = A * B.
    NN,
    /// A is m x k, B is n x k row-major (PyTorch's weight layout): C = A * B^T.
    NT,
    /// A is k x m, B is k x n, both row-major: C = A^T * B (XᵀX with A = B = X, tokens x features).
    TN,
}

/// Which kernel ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    Tiled,
    Coop,
}

const TILE: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    accumulate: u32,
    a_off: u32,
    lda: u32,
    b_off: u32,
    ldb: u32,
    c_off: u32,
    ldc: u32,
    b_trans: u32,
    alpha: f32,
    lower: u32,
    /// Cooperative kernel only: 2 when A's (B's) offset and leading dimension are multiples of
    /// 8, 1 when even, 0 otherwise.
    a_align: u32,
    b_align: u32,
    /// With `lower`: the row of the triangle's matrix that this dispatch's row 0 is.
    row_base: u32,
    /// Tiled kernel only: bit 0, op(A) is lower triangular (zero above its diagonal), so each
    /// tile's K walk stops after the tile's last row; bit 1, op(B) is lower triangular, so it
    /// starts at the tile's first column. Skipped terms are products with exact zeros.
    tri: u32,
    /// Tiled kernel only: batched dispatches' per-problem element strides (workgroup z).
    a_zs: u32,
    b_zs: u32,
    c_zs: u32,
    /// Split cooperative products only: C's real extent (m and n are the padded split operands')
    /// and where the operands' line exponents start in A's and B's buffers.
    sm: u32,
    sn: u32,
    ea_off: u32,
    eb_off: u32,
}

impl Params {
    /// FLOPs and the bytes read and written at least once (A, B with their element sizes, C
    /// written, and read too when accumulating), for `--profile`.
    fn work(&self, ea: u64, eb: u64) -> (f64, f64) {
        let (m, n, k) = (self.m as f64, self.n as f64, self.k as f64);
        let c = m * n * 4.0 * if self.accumulate != 0 { 2.0 } else { 1.0 };
        // A lower-triangle product does about half of the rectangle's flops, and so does one
        // with a triangular operand (the profile's rates are estimates there); bytes are
        // counted whole.
        let part = if self.lower != 0 || self.tri != 0 {
            0.5
        } else {
            1.0
        };
        (
            part * 2.0 * m * n * k,
            m * k * ea as f64 + k * n * eb as f64 + c,
        )
    }

    /// Offsets and leading dimensions that are multiples of 8 (2) let the cooperative kernel
    /// load interior slices eight elements at a time, even ones (1) two at a time (the tiled
    /// kernel ignores these fields).
    /// Whether this dispatch suits the cooperative kernel's EXACT variant with tiles `bm` x `bn`
    /// and slices `bk` deep: whole tiles and slices only, both operands 8-aligned (after
    /// [`Params::set_align`]).
    fn exact(&self, (bm, bn): (usize, usize), bk: u32) -> bool {
        (self.m as usize).is_multiple_of(bm)
            && (self.n as usize).is_multiple_of(bn)
            && self.k.is_multiple_of(bk)
            && self.a_align == 2
            && self.b_align == 2
    }

    fn set_align(&mut self) {
        let q = |off: u32, ld: u32| {
            if off.is_multiple_of(8) && ld.is_multiple_of(8) {
                2
            } else if off.is_multiple_of(2) && ld.is_multiple_of(2) {
                1
            } else {
                0
            }
        };
        self.a_align = q(self.a_off, self.lda);
        self.b_align = q(self.b_off, self.ldb);
    }
}

pub(crate) fn loader(name: &str, binding: u32, dtype: GpuDtype) -> Result<String> {
    loader_access(name, binding, dtype, "read")
}

fn loader_access(name: &str, binding: u32, dtype: GpuDtype, access: &str) -> Result<String> {
    let (ty, body) = match dtype {
        GpuDtype::F32 => ("f32", format!("return {name}[i];")),
        GpuDtype::F16 => (
            "u32",
            format!("return unpack2x16float({name}[i >> 1u])[i & 1u];"),
        ),
        // bf16 is the top half of an f32: shift the low element up, mask the high one.
        GpuDtype::BF16 => (
            "u32",
            format!(
                "let w = {name}[i >> 1u]; return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));"
            ),
        ),
        GpuDtype::U32 => {
            return Err(Error::invalid("matmul inputs must be f32, f16 or bf16"));
        }
    };
    Ok(format!(
        "@group(0) @binding({binding}) var<storage, {access}> {name}: array<{ty}>;\nfn ld_{}(i: u32) -> f32 {{ {body} }}\n",
        name.to_lowercase()
    ))
}

/// A matmul kernel's source: its prelude (directives and loaders), the layout constants both
/// kernels read, then the kernel body.
fn compose(prelude: String, layout: Layout, body: &str) -> String {
    format!(
        "{prelude}const A_TRANS: bool = {};\nconst B_TRANS: bool = {};\n{body}",
        layout == Layout::TN,
        layout == Layout::NT,
    )
}

/// The register-tiled kernel's source for one (A dtype, B dtype, layout) variant.
pub fn tiled_source(a: GpuDtype, b: GpuDtype, layout: Layout) -> Result<String> {
    let prelude = loader("A", 0, a)? + &loader("B", 1, b)?;
    Ok(compose(prelude, layout, shaders::MATMUL))
}

/// The cooperative kernel's loaders of binding `name`, declared as an array of 16-byte elements
/// (tensor buffers are whole multiples of 16 bytes): element i as f16, the pair at even i, and the
/// eight at i a multiple of 8 as a `mat2x4<f16>` (elements i..i + 4 in column 0). f16 storage is
/// declared as `mat2x4<f16>` so that the eight-element copy is one 16-byte load with no
/// conversion (as `vec4<f16>` it was two 8-byte loads); f32 and bf16 are converted.
fn coop_loader(name: &str, binding: u32, dtype: GpuDtype) -> Result<String> {
    let f = name.to_lowercase();
    // bf16 is the top half of an f32; the host checked (or the caller vouched) that the values
    // fit f16's range.
    let bf = |w: &str| {
        format!("vec2<f16>(f16(bitcast<f32>({w} << 16u)), f16(bitcast<f32>({w} & 0xffff0000u)))")
    };
    let (ty, one, two, eight) = match dtype {
        GpuDtype::F32 => (
            "vec4<f32>",
            format!("return f16({name}[i >> 2u][i & 3u]);"),
            format!(
                "let v = {name}[i >> 2u]; return vec2<f16>(select(v.xy, v.zw, (i & 2u) != 0u));"
            ),
            format!(
                "return mat2x4<f16>(vec4<f16>({name}[i >> 2u]), vec4<f16>({name}[(i >> 2u) + 1u]));"
            ),
        ),
        GpuDtype::F16 => (
            "mat2x4<f16>",
            format!("return {name}[i >> 3u][(i >> 2u) & 1u][i & 3u];"),
            format!(
                "let v = {name}[i >> 3u][(i >> 2u) & 1u]; return select(v.xy, v.zw, (i & 2u) != 0u);"
            ),
            format!("return {name}[i >> 3u];"),
        ),
        GpuDtype::BF16 => (
            "vec4<u32>",
            format!(
                "let w = {name}[i >> 3u][(i >> 1u) & 3u]; return f16(bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u)));"
            ),
            format!(
                "let w = {name}[i >> 3u][(i >> 1u) & 3u]; return {};",
                bf("w")
            ),
            format!(
                "let v = {name}[i >> 3u]; return mat2x4<f16>(vec4<f16>({}, {}), vec4<f16>({}, {}));",
                bf("v.x"),
                bf("v.y"),
                bf("v.z"),
                bf("v.w")
            ),
        ),
        GpuDtype::U32 => {
            return Err(Error::invalid("matmul inputs must be f32, f16 or bf16"));
        }
    };
    Ok(format!(
        "@group(0) @binding({binding}) var<storage, read> {name}: array<{ty}>;\nfn ld_{f}(i: u32) -> f16 {{ {one} }}\nfn ld2_{f}(i: u32) -> vec2<f16> {{ {two} }}\nfn ld8_{f}(i: u32) -> mat2x4<f16> {{ {eight} }}\n"
    ))
}

/// A cooperative kernel's tile configuration: `sgm` x `sgn` subgroups of 32 per workgroup, each
/// computing a 64 x 64 block of C (so a 64·sgm x 64·sgn workgroup tile), with one or two K-slice
/// staging buffers (two overlap the next slice's copy with the current slice's multiplies) of
/// `bk` (32 or 64) positions of K each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopConfig {
    pub sgm: u32,
    pub sgn: u32,
    pub nbuf: u32,
    pub bk: u32,
}

impl CoopConfig {
    /// The configuration used where the tuner has no choice to make: the fastest on the H200
    /// for every problem measured (BENCHMARKS.md, session 6).
    pub const DEFAULT: CoopConfig = CoopConfig {
        sgm: 2,
        sgn: 2,
        nbuf: 1,
        bk: 32,
    };

    /// The candidates the tuner times, each within 48 KiB of workgroup memory.
    /// (64-deep slices lost to 32 on the H200 for every problem measured, 8-15%: BENCHMARKS.md,
    /// session 10; `--coop-config 2x2x1k64` still times them.)
    pub const CANDIDATES: [CoopConfig; 6] = [
        CoopConfig::DEFAULT,
        CoopConfig {
            sgm: 2,
            sgn: 2,
            nbuf: 2,
            bk: 32,
        },
        CoopConfig {
            sgm: 4,
            sgn: 2,
            nbuf: 1,
            bk: 32,
        },
        CoopConfig {
            sgm: 2,
            sgn: 4,
            nbuf: 1,
            bk: 32,
        },
        CoopConfig {
            sgm: 2,
            sgn: 1,
            nbuf: 2,
            bk: 32,
        },
        CoopConfig {
            sgm: 1,
            sgn: 2,
            nbuf: 2,
            bk: 32,
        },
    ];

    /// Workgroup tile rows and columns of C.
    pub fn tile(self) -> (usize, usize) {
        (64 * self.sgm as usize, 64 * self.sgn as usize)
    }

    /// Halves per staged K slice of A (`rows` = BM) or B (BN): the larger of the k-contiguous
    /// (rows x (bk + 8)) and the m/n-contiguous (bk x (rows + 8)) layouts.
    fn slice(self, rows: u32) -> u32 {
        (rows * (self.bk + 8)).max(self.bk * (rows + 8))
    }

    /// Bytes of workgroup memory: the staged slices (f16) and the f32 output scratch (one
    /// 16 x 16 accumulator per subgroup). It decides the speed: on the H200 the default tiles'
    /// f16 product ran 266 TFLOP/s with these 24 KiB and 171 with 4 KiB more of scratch
    /// (BENCHMARKS.md, session 19).
    pub fn workgroup_bytes(self) -> u64 {
        let (bm, bn) = (64 * self.sgm, 64 * self.sgn);
        let halves = self.nbuf * (self.slice(bm) + self.slice(bn));
        2 * halves as u64 + 4 * 256 * (self.sgm * self.sgn) as u64
    }

    /// The configuration of split products (`matmul_coop.wgsl`, SPLIT): the default tiles.
    pub const SPLIT: CoopConfig = CoopConfig::DEFAULT;

    pub fn threads(self) -> u32 {
        32 * self.sgm * self.sgn
    }

    /// "2x2x2": subgroup rows, subgroup columns, buffers; "2x2x1k64" with 64-deep slices.
    pub fn name(self) -> String {
        let k = if self.bk == 32 {
            String::new()
        } else {
            format!("k{}", self.bk)
        };
        format!("{}x{}x{}{k}", self.sgm, self.sgn, self.nbuf)
    }

    pub fn parse(s: &str) -> Result<CoopConfig> {
        let bad = || {
            Error::invalid(format!(
                "coop config {s:?}: expected e.g. 2x2x2 or 2x2x1k64"
            ))
        };
        let (tiles, bk) = match s.trim().split_once('k') {
            Some((t, k)) => (t, k.parse::<u32>().map_err(|_| bad())?),
            None => (s.trim(), 32),
        };
        let v: Vec<u32> = tiles
            .split('x')
            .map(|p| p.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad())?;
        match v[..] {
            [sgm, sgn, nbuf]
                if [1, 2, 4].contains(&sgm)
                    && [1, 2, 4].contains(&sgn)
                    && [1, 2].contains(&nbuf)
                    && [32, 64].contains(&bk) =>
            {
                Ok(CoopConfig { sgm, sgn, nbuf, bk })
            }
            _ => Err(Error::invalid(format!(
                "coop config {s:?}: subgroup rows and columns must be 1, 2 or 4, buffers 1 or 2 and the slice depth (k) 32 or 64"
            ))),
        }
    }

    fn constants(self, split: bool) -> String {
        let (bm, bn) = (64 * self.sgm, 64 * self.sgn);
        let (sa, sb) = (self.nbuf * self.slice(bm), self.nbuf * self.slice(bn));
        format!(
            "const SGM: u32 = {}u;\nconst SGN: u32 = {}u;\nconst NBUF: u32 = {}u;\nconst BK: u32 = {}u;\nconst THREADS: u32 = {}u;\nconst SLICE_A: u32 = {}u;\nconst SLICE_B: u32 = {}u;\nconst SA_LEN: u32 = {sa}u;\nconst SB_LEN: u32 = {sb}u;\nconst SC_LEN: u32 = {}u;\nconst SPLIT: bool = {split};\n",
            self.sgm,
            self.sgn,
            self.nbuf,
            self.bk,
            self.threads(),
            self.slice(bm),
            self.slice(bn),
            256 * self.sgm * self.sgn,
        )
    }
}

/// The cooperative-matrix kernel's source for one (A dtype, B dtype, layout, tiles) variant.
/// `exact`: the variant for products whose every dispatch tiles exactly with 8-aligned operands
/// ([`Params::exact`]), which compiles only the eight-element copy. `split`: the epilogue of an
/// f32-accurate product on operands split into scaled f16 halves by `shaders/split.wgsl`
/// (f16 operands, layout TN; see [`SplitScratch`]).
pub fn coop_source(
    a: GpuDtype,
    b: GpuDtype,
    layout: Layout,
    cfg: CoopConfig,
    exact: bool,
    split: bool,
) -> Result<String> {
    if split && (a != GpuDtype::F16 || b != GpuDtype::F16 || layout != Layout::TN) {
        return Err(Error::invalid(
            "the split cooperative product multiplies split f16 operands in layout TN",
        ));
    }
    let prelude = "enable f16;\nenable wgpu_cooperative_matrix;\n".to_string()
        + &coop_loader("MA", 0, a)?
        + &coop_loader("MB", 1, b)?
        + &cfg.constants(split)
        + &format!("const EXACT: bool = {exact};\n");
    Ok(compose(prelude, layout, shaders::MATMUL_COOP))
}

/// The f32 tiled kernel with A and B declared read_write, so one buffer may be bound as A, B and C
/// of the same dispatch (wgpu allows aliased writable storage bindings; read-only ones conflict
/// with a writable one). Used by the in-place dense linear algebra of `gpu::linalg`.
pub fn aliased_source(b_trans: bool) -> Result<String> {
    let prelude = loader_access("A", 0, GpuDtype::F32, "read_write")?
        + &loader_access("B", 1, GpuDtype::F32, "read_write")?;
    let layout = if b_trans { Layout::NT } else { Layout::NN };
    Ok(compose(prelude, layout, shaders::MATMUL))
}

/// Every variant's source, for the naga validation test.
pub fn all_sources() -> Vec<(String, String, bool)> {
    let mut v = Vec::new();
    for t in [false, true] {
        if let Ok(s) = aliased_source(t) {
            v.push((format!("matmul.wgsl aliased b_trans={t}"), s, false));
        }
    }
    for cfg in CoopConfig::CANDIDATES {
        for l in [Layout::NN, Layout::NT, Layout::TN] {
            for exact in [false, true] {
                if let Ok(s) = coop_source(GpuDtype::F16, GpuDtype::F16, l, cfg, exact, false) {
                    let name = format!("matmul_coop.wgsl {} {l:?} exact={exact}", cfg.name());
                    v.push((name, s, true));
                }
            }
        }
    }
    for a in [GpuDtype::F32, GpuDtype::F16, GpuDtype::BF16] {
        for b in [GpuDtype::F32, GpuDtype::F16, GpuDtype::BF16] {
            for l in [Layout::NN, Layout::NT, Layout::TN] {
                if let Ok(s) = tiled_source(a, b, l) {
                    v.push((format!("matmul.wgsl {a:?}x{b:?} {l:?}"), s, false));
                }
                if let Ok(s) = coop_source(a, b, l, CoopConfig::DEFAULT, false, false) {
                    v.push((format!("matmul_coop.wgsl {a:?}x{b:?} {l:?}"), s, true));
                }
            }
        }
    }
    for exact in [false, true] {
        let s = coop_source(
            GpuDtype::F16,
            GpuDtype::F16,
            Layout::TN,
            CoopConfig::SPLIT,
            exact,
            true,
        );
        if let Ok(s) = s {
            v.push((format!("matmul_coop.wgsl split exact={exact}"), s, true));
        }
    }
    v.push(("split.wgsl".into(), shaders::SPLIT.to_string(), false));
    v
}

fn dims(a: &GpuTensor, b: &GpuTensor, layout: Layout) -> (usize, usize, usize) {
    match layout {
        Layout::NN => (a.rows, b.cols, a.cols),
        Layout::NT => (a.rows, b.rows, a.cols),
        Layout::TN => (a.cols, b.cols, a.rows),
    }
}

/// Whether this context can run the cooperative-matrix kernel at all.
pub fn coop_available(ctx: &GpuContext) -> bool {
    ctx.caps.coop_f16_16x16 && ctx.caps.shader_f16 && ctx.caps.subgroup_size == (32, 32)
}

/// Whether `matmul_into` with `path: None` picks the cooperative kernel for these operands: only
/// where rounding them to f16 is exact (both stored as f16).
pub fn coop_eligible(ctx: &GpuContext, a: &GpuTensor, b: &GpuTensor) -> bool {
    coop_available(ctx) && a.dtype == GpuDtype::F16 && b.dtype == GpuDtype::F16
}

/// C = A * op(B) into a new m x n f32 tensor, on the fastest eligible path.
pub fn matmul(ctx: &GpuContext, a: &GpuTensor, b: &GpuTensor, layout: Layout) -> Result<GpuTensor> {
    let (m, n, _) = dims(a, b, layout);
    let c = GpuTensor::empty(ctx, m, n, GpuDtype::F32)?;
    matmul_into(ctx, a, b, layout, &c, false, None)?;
    Ok(c)
}

/// C = [C +] A * op(B) into an existing m x n f32 tensor. `path` forces a kernel (an error if the
/// cooperative one is not eligible); `None` picks the fastest eligible. Returns the path taken.
pub fn matmul_into(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    layout: Layout,
    c: &GpuTensor,
    accumulate: bool,
    path: Option<MatmulPath>,
) -> Result<MatmulPath> {
    matmul_impl(ctx, a, b, layout, c, accumulate, path, None, None)
}

/// The lower triangle of C = [C +] Aᵀ·A-like products in layout TN (A stored k x m, B k x n,
/// typically B = A, as in XᵀX): only tiles of C that reach its lower triangle (column <= row) are
/// computed, so a symmetric product costs about half. Elements above the diagonal are left as
/// they are in tiles wholly above it and hold their own products in tiles that straddle it; the
/// caller mirrors the lower triangle (`gpu::stats` does). `k_piece` bounds the K range one
/// dispatch sums (0: no bound): each piece's sums are added into C in turn, so an element is a
/// sum of at most `k_piece` products plus one addition per piece, not one long f32 sum.
/// Returns the path taken.
pub fn matmul_lower_into(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    c: &GpuTensor,
    accumulate: bool,
    path: Option<MatmulPath>,
    k_piece: usize,
) -> Result<MatmulPath> {
    let piece = if k_piece == 0 { usize::MAX } else { k_piece };
    matmul_impl(
        ctx,
        a,
        b,
        Layout::TN,
        c,
        accumulate,
        path,
        None,
        Some(piece),
    )
}

/// m, n and the shape's name (for errors and the tuner) of C = A * op(B) into `c`; an error
/// naming all three tensors where their shapes do not fit together or C is not f32.
fn checked_dims(
    a: &GpuTensor,
    b: &GpuTensor,
    layout: Layout,
    c: &GpuTensor,
) -> Result<(usize, usize, String)> {
    let (m, n, k) = dims(a, b, layout);
    let shape = format!(
        "{}x{}x{} ({:?}, A {:?}, B {:?})",
        m, n, k, layout, a.dtype, b.dtype
    );
    let kb = match layout {
        Layout::NN | Layout::TN => b.rows,
        Layout::NT => b.cols,
    };
    if kb != k || c.rows != m || c.cols != n || c.dtype != GpuDtype::F32 {
        return Err(Error::Shape {
            op: "matmul".into(),
            expected: format!("A {m}x{k}, B with k = {k}, C {m}x{n} f32"),
            got: format!(
                "A {}, B {}, C {}",
                a.shape_str(),
                b.shape_str(),
                c.shape_str()
            ),
        });
    }
    Ok((m, n, shape))
}

/// Whether the cooperative kernel runs: as `path` forces (an error where the adapter lacks it),
/// else `default`.
fn coop_wanted(
    ctx: &GpuContext,
    path: Option<MatmulPath>,
    default: bool,
    shape: &str,
) -> Result<bool> {
    match path {
        Some(MatmulPath::Coop) if !coop_available(ctx) => Err(Error::gpu(
            "matmul_coop",
            shape,
            format!(
                "adapter {} lacks 16x16x16 f16 -> f32 cooperative matrices with 32-wide subgroups",
                ctx.adapter
            ),
        )),
        Some(MatmulPath::Coop) => Ok(true),
        Some(MatmulPath::Tiled) => Ok(false),
        None => Ok(default),
    }
}

/// Every product's entry: shapes checked, the kernel chosen (`path`, `cfg`), then the walk.
/// `lower`: `Some(k_piece)` computes only C's lower triangle (layout TN) with at most `k_piece`
/// K rows summed per dispatch ([`matmul_lower_into`]).
#[allow(clippy::too_many_arguments)]
fn matmul_impl(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    layout: Layout,
    c: &GpuTensor,
    accumulate: bool,
    path: Option<MatmulPath>,
    cfg: Option<CoopConfig>,
    lower: Option<usize>,
) -> Result<MatmulPath> {
    let (m, n, shape) = checked_dims(a, b, layout, c)?;
    if m == 0 || n == 0 {
        return Ok(MatmulPath::Tiled);
    }
    let use_coop = coop_wanted(ctx, path, coop_eligible(ctx, a, b), &shape)?;
    let op = Op {
        layout,
        accumulate,
        lower: lower.is_some(),
        k_piece: lower.unwrap_or(usize::MAX),
    };
    match (use_coop, cfg) {
        (false, _) => run_walk(ctx, a, b, op, c, &shape, None)?,
        (true, Some(cfg)) => run_walk(ctx, a, b, op, c, &shape, Some(cfg))?,
        (true, None) if lower.is_none() && as_tn_pays(layout, a, b) => {
            run_as_tn(ctx, a, b, layout, c, accumulate, true)?
        }
        (true, None) => run_tuned(ctx, a, b, op, c, &shape)?,
    }
    Ok(if use_coop {
        MatmulPath::Coop
    } else {
        MatmulPath::Tiled
    })
}

/// Whether a product in layout NN or NT is run as Aᵀ-stored TN on transposed f16 copies
/// ([`matmul_via_tn`]): both operands f16 in one buffer each; m and n multiples of 128 and k of
/// 32, so the default tiles cover the TN product exactly (the general TN kernel was slower than
/// the general NT one: 4000³ took 3.76 ms this way against 2.04 ms as NT); and large enough that
/// the transposes' memory traffic, 4k bytes per transposed row (A's m rows, and B's n for NT),
/// costs less than the TN kernel saves. On the H200 the TN kernel runs 247 TFLOP/s at 4096³
/// against NT's 185 and NN's 205, and 277 at 8192³ against 211 and 244, and a transpose moves
/// 2.3 TB/s: for NT the saving exceeds the traffic once mn / (m + n) passes about 1000 at
/// 4096³'s rates and about 1900 at 8192³'s, for NN once n passes about 1050 and 1800 (only A is
/// transposed). The threshold is mn >= 2048 x (rows transposed), where the route was measured
/// to win: NT 4096³ 187 -> 207 TFLOP/s, 8192x4096x4096 199 -> 228 (BENCHMARKS.md, session 13);
/// NN 4096³ 204 -> 226-228, 8192³ 245 -> 266-274 (session 14). A 4096 x 4096 C qualifies for
/// NT, a 2048-token batch against a 4096-wide layer does not. Layout TN is already the
/// kernel's orientation: never.
pub fn as_tn_pays(layout: Layout, a: &GpuTensor, b: &GpuTensor) -> bool {
    let (m, n, k) = dims(a, b, layout);
    let (kb, transposed) = match layout {
        Layout::TN => return false,
        Layout::NN => (b.rows, m),
        Layout::NT => (b.cols, m + n),
    };
    one_f16_buffer(a)
        && one_f16_buffer(b)
        && k == kb
        && m.is_multiple_of(128)
        && n.is_multiple_of(128)
        && k.is_multiple_of(32)
        && m * n >= 2048 * transposed
}

/// C = [C +] A * op(B) for f16 operands in one buffer each (rows and columns of each transposed
/// operand multiples of 4), computed as Aᵀ-stored TN: A (layouts NN and NT) and B (layout NT)
/// are transposed by `shaders/transpose.wgsl` into temporary buffers (freed on return), then
/// multiplied in layout TN, the tensor-core kernel's fastest orientation. The inputs are the
/// same f16 values and the sums run over K in the same slices, so the result equals the direct
/// product's to f32 rounding. Layout TN runs as it is. `path` forces a kernel as in
/// [`matmul_into`]; `None` takes the tuned cooperative kernel where available. `matmul_into`
/// takes this route by itself for large f16 products ([`as_tn_pays`]).
pub fn matmul_via_tn(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    layout: Layout,
    c: &GpuTensor,
    accumulate: bool,
    path: Option<MatmulPath>,
) -> Result<MatmulPath> {
    let (m, n, shape) = checked_dims(a, b, layout, c)?;
    if m == 0 || n == 0 {
        return Ok(MatmulPath::Tiled);
    }
    let coop = coop_wanted(ctx, path, coop_available(ctx), &shape)?;
    run_as_tn(ctx, a, b, layout, c, accumulate, coop)?;
    Ok(if coop {
        MatmulPath::Coop
    } else {
        MatmulPath::Tiled
    })
}

/// The transposes and the TN product of [`matmul_via_tn`] (shapes already checked), on the
/// tuned cooperative kernel (`coop`) or the f32 tiled one.
fn run_as_tn(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    layout: Layout,
    c: &GpuTensor,
    accumulate: bool,
    coop: bool,
) -> Result<()> {
    let at = match layout {
        Layout::TN => None,
        Layout::NN | Layout::NT => Some(transpose_f16(ctx, a)?),
    };
    let bt = match layout {
        Layout::NT => Some(transpose_f16(ctx, b)?),
        Layout::NN | Layout::TN => None,
    };
    let (a, b) = (at.as_ref().unwrap_or(a), bt.as_ref().unwrap_or(b));
    let (_, _, shape) = checked_dims(a, b, Layout::TN, c)?;
    let op = Op::whole(Layout::TN, accumulate);
    if coop {
        run_tuned(ctx, a, b, op, c, &shape)
    } else {
        run_walk(ctx, a, b, op, c, &shape, None)
    }
}

/// Whether `t` is f16 held in one buffer: what the transposes take, so what the TN route needs.
fn one_f16_buffer(t: &GpuTensor) -> bool {
    t.dtype == GpuDtype::F16 && t.chunks.len() == 1
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TransposeParams {
    rows: u32,
    cols: u32,
    pad: [u32; 2],
}

/// Xᵀ (cols x rows, f16, one buffer) of an f16 tensor `x` held in one buffer whose rows and
/// columns are multiples of 4 (`shaders/transpose.wgsl`).
pub fn transpose_f16(ctx: &GpuContext, x: &GpuTensor) -> Result<GpuTensor> {
    let y = GpuTensor::empty(ctx, x.cols, x.rows, GpuDtype::F16)?;
    transpose_f16_into(ctx, x, &y)?;
    Ok(y)
}

/// [`transpose_f16`] into an existing cols x rows f16 tensor `y` (one buffer).
pub fn transpose_f16_into(ctx: &GpuContext, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    const KERNEL: &str = "transpose";
    let shape = format!("{} -> {}", x.shape_str(), y.shape_str());
    if !one_f16_buffer(x)
        || !one_f16_buffer(y)
        || !x.rows.is_multiple_of(4)
        || !x.cols.is_multiple_of(4)
        || (y.rows, y.cols) != (x.cols, x.rows)
    {
        return Err(Error::invalid(format!(
            "transpose: expected f16 tensors in one buffer each, rows and columns multiples of 4, the output the input's shape swapped; got {shape} in {} and {} buffers",
            x.chunks.len(),
            y.chunks.len()
        )));
    }
    let groups = (x.cols.div_ceil(64), x.rows.div_ceil(64));
    let max = ctx.max_workgroups_per_dim() as usize;
    if groups.0 > max || groups.1 > max {
        return Err(Error::gpu(
            KERNEL,
            &shape,
            "the dispatch grid limit is exceeded",
        ));
    }
    let u = |v: usize| {
        u32::try_from(v)
            .map_err(|_| Error::gpu(KERNEL, &shape, format!("{v} does not fit in 32 bits")))
    };
    // Both tensors are one buffer of rows x cols halves, so every index below rows * cols fits
    // (checked here); the kernel reads and writes only inside rows x cols.
    u(x.rows * x.cols)?;
    let params = TransposeParams {
        rows: u(x.rows)?,
        cols: u(x.cols)?,
        pad: [0; 2],
    };
    let pipe = ctx.pipeline(KERNEL, shaders::TRANSPOSE, "main", true)?;
    // Two bytes read and two written per element; no arithmetic.
    ctx.add_work(&pipe, 0.0, 4.0 * (x.rows * x.cols) as f64);
    let d = Dispatch {
        buffers: vec![&x.chunks[0].buffer, &y.chunks[0].buffer],
        uniform: Some(bytemuck::bytes_of(&params)),
        groups: (groups.0 as u32, groups.1 as u32, 1),
    };
    ctx.run(KERNEL, &shape, &pipe, &[d])
}

/// C = [C +] A * op(B) on the cooperative kernel with tile configuration `cfg` (benchmarks and
/// the tuner compare configurations with this; an error where the kernel is unavailable or the
/// configuration exceeds the adapter's workgroup limits).
#[allow(clippy::too_many_arguments)]
pub fn matmul_into_coop(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    layout: Layout,
    c: &GpuTensor,
    accumulate: bool,
    cfg: CoopConfig,
) -> Result<()> {
    matmul_impl(
        ctx,
        a,
        b,
        layout,
        c,
        accumulate,
        Some(MatmulPath::Coop),
        Some(cfg),
        None,
    )?;
    Ok(())
}

/// What one product computes besides its operands: their layout, whether C accumulates, and
/// whether only C's lower triangle is wanted (honoured by the TN walk; `matmul_lower_into` is
/// the only way to ask for it), with the longest K range one dispatch sums (`k_piece`; the TN
/// walk adds the pieces into C one after another).
#[derive(Clone, Copy)]
struct Op {
    layout: Layout,
    accumulate: bool,
    lower: bool,
    k_piece: usize,
}

impl Op {
    /// A whole product: every tile of C, K summed unsplit.
    fn whole(layout: Layout, accumulate: bool) -> Op {
        Op {
            layout,
            accumulate,
            lower: false,
            k_piece: usize::MAX,
        }
    }
}

/// Whether `cfg` fits this adapter's workgroup memory and invocation limits.
pub fn coop_fits(ctx: &GpuContext, cfg: CoopConfig) -> bool {
    cfg.workgroup_bytes() <= ctx.limits.max_compute_workgroup_storage_size as u64
        && cfg.threads() <= ctx.limits.max_compute_invocations_per_workgroup
}

/// The cooperative product on the tuned tile configuration (`gpu::tune`): the chosen one for this
/// adapter and problem, or, while the problem is being tuned, the next candidate, timed alone.
#[allow(clippy::too_many_arguments)]
fn run_tuned(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    op: Op,
    c: &GpuTensor,
    shape: &str,
) -> Result<()> {
    use super::tune::{Pick, Tuner};
    let pick = {
        let mut t = ctx.tuner.lock().map_err(super::context::poisoned)?;
        let tuner = t.get_or_insert_with(|| {
            let a = &ctx.adapter;
            let cands = CoopConfig::CANDIDATES
                .into_iter()
                .filter(|&c| coop_fits(ctx, c))
                .collect();
            Tuner::new(
                &format!("{} | {} | {}", a.name, a.backend, a.driver),
                cands,
                super::peaks::cache_dir(),
            )
        });
        tuner.pick(shape)
    };
    match pick {
        Pick::Use(cfg) => run_walk(ctx, a, b, op, c, shape, Some(cfg)),
        Pick::Trial { cfg, warm_up } => {
            // Compiled (both variants) before the clock starts; timed on the GPU's own clock.
            for exact in [false, true] {
                coop_pipeline(ctx, a.dtype, b.dtype, op.layout, cfg, exact, false)?;
            }
            // The trials run at the clocks the products will run at. Best effort: a warm-up
            // that fails costs only the trials' accuracy.
            if warm_up && let Err(e) = super::peaks::hold_clock(ctx, super::tune::WARM_UP_S) {
                log::warn!("tile trial warm-up failed: {e}");
            }
            let secs = ctx.gpu_seconds("matmul_coop", shape, || {
                run_walk(ctx, a, b, op, c, shape, Some(cfg))
            })?;
            let mut t = ctx.tuner.lock().map_err(super::context::poisoned)?;
            if let Some(tuner) = t.as_mut() {
                tuner.record(shape, cfg, secs);
            }
            Ok(())
        }
    }
}

/// The cooperative kernel's cached pipeline and source key for one variant ([`coop_source`]).
fn coop_pipeline(
    ctx: &GpuContext,
    a: GpuDtype,
    b: GpuDtype,
    layout: Layout,
    cfg: CoopConfig,
    exact: bool,
    split: bool,
) -> Result<(std::sync::Arc<wgpu::ComputePipeline>, String)> {
    let x = if exact { " exact" } else { "" };
    let s = if split { " split" } else { "" };
    let key = format!("matmul_coop{s} {a:?}x{b:?} {layout:?} {}{x}", cfg.name());
    // Trusted: every offset and extent a walk passes is derived from the chunk table, and a
    // region product's regions are checked to lie inside their buffers (`RegionGemm::prepare`),
    // so each index the kernel forms (guarded by m, n, k) stays inside its binding; the exact
    // variant is only chosen where every dispatch tiles exactly.
    let pipe = ctx.pipeline_from(&key, "main", true, || {
        coop_source(a, b, layout, cfg, exact, split)
    })?;
    Ok((pipe, key))
}

/// The pipeline of a walk's dispatches `params` (their alignment set): the tiled kernel, or the
/// cooperative one with `coop`'s tiles, in its exact variant where every dispatch allows it.
fn walk_pipeline(
    ctx: &GpuContext,
    a: GpuDtype,
    b: GpuDtype,
    layout: Layout,
    coop: Option<CoopConfig>,
    params: &[Params],
) -> Result<(std::sync::Arc<wgpu::ComputePipeline>, String)> {
    match coop {
        Some(cfg) => {
            let exact = params.iter().all(|p| p.exact(cfg.tile(), cfg.bk));
            coop_pipeline(ctx, a, b, layout, cfg, exact, false)
        }
        None => {
            let key = format!("matmul {a:?}x{b:?} {layout:?}");
            // Trusted: every offset and extent the walk passes is derived from the chunk table,
            // so each index the kernel forms (guarded by m, n, k) stays inside its binding.
            let pipe = ctx.pipeline_from(&key, "main", true, || tiled_source(a, b, layout))?;
            Ok((pipe, key))
        }
    }
}

/// Records the kernel's dispatches over the operands' chunks: the tiled kernel (`coop` None)
/// tiles C by 128 x 128, the cooperative one by its configuration's tile.
#[allow(clippy::too_many_arguments)]
fn run_walk(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    op: Op,
    c: &GpuTensor,
    shape: &str,
    coop: Option<CoopConfig>,
) -> Result<()> {
    let Op {
        layout, accumulate, ..
    } = op;
    let (_, n, k) = dims(a, b, layout);
    let (bm, bn) = if let Some(cfg) = coop {
        if !coop_fits(ctx, cfg) {
            return Err(Error::gpu(
                "matmul_coop",
                shape,
                format!(
                    "tile configuration {} needs {} bytes of workgroup memory and {} invocations; this adapter allows {} and {}",
                    cfg.name(),
                    cfg.workgroup_bytes(),
                    cfg.threads(),
                    ctx.limits.max_compute_workgroup_storage_size,
                    ctx.limits.max_compute_invocations_per_workgroup
                ),
            ));
        }
        cfg.tile()
    } else {
        (TILE, TILE)
    };
    // Only the TN walk honours `lower` (its only caller is XᵀX); the others compute every tile,
    // which contains the lower triangle too.
    if layout == Layout::TN {
        return run_walk_tn(ctx, a, b, c, op, shape, coop, (bm, bn));
    }
    let max_rows = ctx.max_workgroups_per_dim() as usize * bm;
    if n.div_ceil(bn) > ctx.max_workgroups_per_dim() as usize {
        return Err(Error::gpu(
            "matmul",
            shape,
            "n exceeds the dispatch grid limit",
        ));
    }
    let mut params = Vec::new();
    let mut binds = Vec::new();
    for (r0, r1) in GpuTensor::common_row_ranges(&[a, c]) {
        let (ai, ar) = a.locate(r0);
        let (ci, cr) = c.locate(r0);
        let mut s = r0;
        while s < r1 {
            let e = (s + max_rows).min(r1);
            for (bi, bc) in b.chunks.iter().enumerate() {
                let (sub_n, sub_k, a_koff, c_noff) = match layout {
                    Layout::NN | Layout::TN => (n, bc.rows, bc.row_start, 0),
                    Layout::NT => (bc.rows, k, 0, bc.row_start),
                };
                if sub_n == 0 || sub_k == 0 {
                    continue;
                }
                let acc = accumulate || (layout == Layout::NN && bi > 0);
                params.push(Params {
                    m: (e - s) as u32,
                    n: sub_n as u32,
                    k: sub_k as u32,
                    accumulate: acc as u32,
                    a_off: ((ar + s - r0) * k + a_koff) as u32,
                    lda: k as u32,
                    b_off: 0,
                    ldb: b.cols as u32,
                    c_off: ((cr + s - r0) * n + c_noff) as u32,
                    ldc: n as u32,
                    b_trans: (layout == Layout::NT) as u32,
                    alpha: 1.0,
                    lower: 0,
                    a_align: 0,
                    b_align: 0,
                    row_base: 0,
                    tri: 0,
                    a_zs: 0,
                    b_zs: 0,
                    c_zs: 0,
                    sm: 0,
                    sn: 0,
                    ea_off: 0,
                    eb_off: 0,
                });
                binds.push((ai, bi, ci, sub_n, e - s));
            }
            s = e;
        }
    }
    if layout == Layout::NN && b.chunks.iter().all(|ch| ch.rows == 0) {
        // k == 0: the product is zero.
        return zero_or_keep(ctx, c, accumulate);
    }
    for p in &mut params {
        p.set_align();
    }
    let (pipe, key) = walk_pipeline(ctx, a.dtype, b.dtype, layout, coop, &params)?;
    for p in &params {
        let (f, b) = p.work(a.dtype.size(), b.dtype.size());
        ctx.add_work(&pipe, f, b);
    }
    let dispatches: Vec<Dispatch> = params
        .iter()
        .zip(&binds)
        .map(|(p, &(ai, bi, ci, sub_n, rows))| Dispatch {
            buffers: vec![
                &a.chunks[ai].buffer,
                &b.chunks[bi].buffer,
                &c.chunks[ci].buffer,
            ],
            uniform: Some(bytemuck::bytes_of(p)),
            groups: (sub_n.div_ceil(bn) as u32, rows.div_ceil(bm) as u32, 1),
        })
        .collect();
    ctx.run(&key, shape, &pipe, &dispatches)
}

/// Layout TN: C (m x n) = [C +] A^T (A: k x m) * B (k x n). Dispatches are recorded in K order
/// (every chunk of C once per K range) and run in one pass, so the later ones accumulate onto
/// the earlier ones' results. Every offset and extent is checked to fit the u32 indices the
/// kernel forms inside its chunk (that check is what makes the unchecked pipeline safe).
#[allow(clippy::too_many_arguments)]
fn run_walk_tn(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    c: &GpuTensor,
    op: Op,
    shape: &str,
    coop: Option<CoopConfig>,
    (bm, bn): (usize, usize),
) -> Result<()> {
    let accumulate = op.accumulate;
    let (m, n) = (a.cols, b.cols);
    let max_wg = ctx.max_workgroups_per_dim() as usize;
    if n.div_ceil(bn) > max_wg {
        return Err(Error::gpu(
            "matmul",
            shape,
            "n exceeds the dispatch grid limit",
        ));
    }
    let u = |v: usize| -> Result<u32> {
        u32::try_from(v)
            .map_err(|_| Error::gpu("matmul", shape, format!("{v} does not fit in 32 bits")))
    };
    for t in [a, b, c] {
        for ch in &t.chunks {
            u(ch.rows * t.cols)?;
        }
    }
    let max_rows = max_wg * bm;
    let mut params = Vec::new();
    let mut binds = Vec::new();
    let piece = op.k_piece.max(1);
    let ranges = GpuTensor::common_row_ranges(&[a, b])
        .into_iter()
        .flat_map(|(k0, k1)| {
            (k0..k1)
                .step_by(piece)
                .map(move |s| (s, s.saturating_add(piece).min(k1)))
        });
    for (pass, (k0, k1)) in ranges.enumerate() {
        let (ai, ar) = a.locate(k0);
        let (bi, br) = b.locate(k0);
        for (ci, cc) in c.chunks.iter().enumerate() {
            let mut s = 0;
            while s < cc.rows {
                let e = (s + max_rows).min(cc.rows);
                params.push(Params {
                    m: u(e - s)?,
                    n: u(n)?,
                    k: u(k1 - k0)?,
                    accumulate: (accumulate || pass > 0) as u32,
                    a_off: u(ar * m + cc.row_start + s)?,
                    lda: u(m)?,
                    b_off: u(br * n)?,
                    ldb: u(n)?,
                    c_off: u(s * n)?,
                    ldc: u(n)?,
                    b_trans: 0,
                    alpha: 1.0,
                    lower: op.lower as u32,
                    a_align: 0,
                    b_align: 0,
                    row_base: u(cc.row_start + s)?,
                    tri: 0,
                    a_zs: 0,
                    b_zs: 0,
                    c_zs: 0,
                    sm: 0,
                    sn: 0,
                    ea_off: 0,
                    eb_off: 0,
                });
                binds.push((ai, bi, ci, e - s));
                s = e;
            }
        }
    }
    if params.is_empty() {
        // k == 0: the product is zero.
        return zero_or_keep(ctx, c, accumulate);
    }
    for p in &mut params {
        p.set_align();
    }
    let (pipe, label) = walk_pipeline(ctx, a.dtype, b.dtype, Layout::TN, coop, &params)?;
    for p in &params {
        let (f, b) = p.work(a.dtype.size(), b.dtype.size());
        ctx.add_work(&pipe, f, b);
    }
    let dispatches: Vec<Dispatch> = params
        .iter()
        .zip(&binds)
        .map(|(p, &(ai, bi, ci, rows))| Dispatch {
            buffers: vec![
                &a.chunks[ai].buffer,
                &b.chunks[bi].buffer,
                &c.chunks[ci].buffer,
            ],
            uniform: Some(bytemuck::bytes_of(p)),
            groups: (n.div_ceil(bn) as u32, rows.div_ceil(bm) as u32, 1),
        })
        .collect();
    ctx.run(&label, shape, &pipe, &dispatches)
}

fn zero_or_keep(ctx: &GpuContext, c: &GpuTensor, accumulate: bool) -> Result<()> {
    if !accumulate {
        c.fill_u32(ctx, 0);
    }
    Ok(())
}

/// A matrix inside one f32 storage buffer: element (r, c) is at `off + r * ld + c`; `len` is the
/// buffer's length in elements (checked against every element the product touches).
#[derive(Clone, Copy)]
pub(crate) struct Region<'a> {
    pub buf: &'a wgpu::Buffer,
    pub len: usize,
    pub off: usize,
    pub ld: usize,
}

/// One C[m x n] = [C +] alpha * A[m x k] * op(B) on regions of single buffers, for algorithms that
/// address blocks of larger matrices (blocked Cholesky, GPTQ's lazy updates). `b_trans`: B is
/// stored n x k. `lower`: only tiles reaching C's lower triangle are computed. `a_lower_tri` /
/// `b_lower_tri`: A (m = k) / B (k = n, not transposed) is lower triangular, zero above its
/// diagonal, so each tile sums only the K range where both are nonzero (about half the FLOPs of
/// a triangular inverse's products).
pub(crate) struct RegionGemm<'a> {
    pub a: Region<'a>,
    pub b: Region<'a>,
    pub c: Region<'a>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub b_trans: bool,
    pub alpha: f32,
    pub accumulate: bool,
    pub lower: bool,
    pub a_lower_tri: bool,
    pub b_lower_tri: bool,
    /// Several products of the same shape in one dispatch, each at these element strides past
    /// the previous one's A, B and C offsets (independent products: C regions must not overlap
    /// the other problems' operands).
    pub batch: Batch,
    /// Run on the tensor cores as a split product (f32-accurate: the operands split into
    /// per-row and per-column scaled f16 halves in this scratch by `shaders/split.wgsl`, then
    /// one f16 product over three times the depth, `matmul_coop.wgsl` SPLIT) instead of the f32
    /// tiled kernel. Three dispatches ([`RegionGemm::prepare_steps`]). Needs [`coop_available`];
    /// not with `aliased`, `lower`, triangular operands or a batch.
    pub split: Option<&'a SplitScratch>,
}

/// The scratch of split products ([`RegionGemm::split`]): each operand as three segments of
/// scaled f16 halves plus one exponent per line (`shaders/split.wgsl`), sized for the largest
/// product that uses it. Products that share a scratch must run in order (each one's splits
/// are recorded right before it, as every step of one submission is).
pub(crate) struct SplitScratch {
    a: GpuTensor,
    b: GpuTensor,
}

/// Lines padded to whole tiles and K to whole slices, as a split operand stores them.
fn split_dims(lines: usize, tile: usize, k: usize) -> (usize, usize) {
    let bk = CoopConfig::SPLIT.bk as usize;
    (lines.div_ceil(tile) * tile, k.div_ceil(bk) * bk)
}

/// Halves of a split operand of `lp` lines and depth `kp`: three segments, then the exponents.
fn split_halves(lp: usize, kp: usize) -> usize {
    (3 * kp + 1) * lp
}

impl SplitScratch {
    /// Room for products of up to `m` rows, `n` columns and depth `k`, each operand in one
    /// binding.
    pub fn new(ctx: &GpuContext, m: usize, n: usize, k: usize) -> Result<SplitScratch> {
        let (bm, bn) = CoopConfig::SPLIT.tile();
        let alloc = |lines: usize, tile: usize| -> Result<GpuTensor> {
            let (lp, kp) = split_dims(lines.max(1), tile, k.max(1));
            let t = GpuTensor::empty(ctx, 3 * kp + 1, lp, GpuDtype::F16)?;
            if t.chunks.len() != 1 || split_halves(lp, kp) > u32::MAX as usize {
                return Err(Error::gpu(
                    "matmul_coop",
                    format!("split {m}x{n}x{k}"),
                    format!(
                        "a split operand of {} MiB does not fit one storage binding of this adapter",
                        (split_halves(lp, kp) * 2) >> 20
                    ),
                ));
            }
            Ok(t)
        };
        Ok(SplitScratch {
            a: alloc(m, bm)?,
            b: alloc(n, bn)?,
        })
    }

    /// Bytes of a scratch for products of up to `m` x `n` x `k` ([`SplitScratch::new`]): A's
    /// part and B's.
    pub fn bytes(m: usize, n: usize, k: usize) -> (u64, u64) {
        let (bm, bn) = CoopConfig::SPLIT.tile();
        let part = |lines: usize, tile: usize| {
            let (lp, kp) = split_dims(lines.max(1), tile, k.max(1));
            2 * split_halves(lp, kp) as u64
        };
        (part(m, bm), part(n, bn))
    }

    fn holds(t: &GpuTensor, lp: usize, kp: usize) -> bool {
        split_halves(lp, kp) <= t.rows * t.cols
    }
}

/// Whether split products run on this adapter: cooperative matrices, and room for their tiles.
pub(crate) fn split_available(ctx: &GpuContext) -> bool {
    coop_available(ctx) && coop_fits(ctx, CoopConfig::SPLIT)
}

/// [`split_available`] as an error naming the adapter's missing piece (`shape`: the product).
pub(crate) fn check_split(ctx: &GpuContext, shape: &str) -> Result<()> {
    if split_available(ctx) {
        return Ok(());
    }
    let cfg = CoopConfig::SPLIT;
    Err(Error::gpu(
        "matmul_coop",
        shape,
        format!(
            "adapter {} cannot run the split cooperative product (16x16x16 f16 cooperative matrices, 32-wide subgroups and {} bytes of workgroup memory)",
            ctx.adapter,
            cfg.workgroup_bytes()
        ),
    ))
}

/// The uniforms of `shaders/split.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SplitParams {
    lines: u32,
    k: u32,
    kp: u32,
    lp: u32,
    off: u32,
    ls: u32,
    ks: u32,
    lo_seg: u32,
    e_off: u32,
    pad: [u32; 3],
}

impl SplitParams {
    /// Line l, position t of the source at `off + l * ls + t * ks` (`lines` x `k`), written as
    /// `lp` lines of three `kp`-deep segments (lo in segment `lo_seg`), exponents after them.
    #[allow(clippy::too_many_arguments)]
    fn new(
        lines: usize,
        k: usize,
        kp: usize,
        lp: usize,
        off: usize,
        ls: usize,
        ks: usize,
        lo_seg: u32,
    ) -> SplitParams {
        SplitParams {
            lines: lines as u32,
            k: k as u32,
            kp: kp as u32,
            lp: lp as u32,
            off: off as u32,
            ls: ls as u32,
            ks: ks as u32,
            lo_seg,
            e_off: (3 * kp * lp) as u32,
            pad: [0; 3],
        }
    }

    /// The split's dispatch, `src` into `out` (one workgroup per 32 lines).
    fn step<'b>(
        self,
        pipeline: std::sync::Arc<wgpu::ComputePipeline>,
        src: &'b wgpu::Buffer,
        out: &'b wgpu::Buffer,
    ) -> GemmStep<'b> {
        GemmStep {
            pipeline,
            buffers: vec![src, out],
            uniform: bytemuck::bytes_of(&self).to_vec(),
            groups: (self.lp / 32, 1, 1),
        }
    }
}

/// See [`RegionGemm::batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Batch {
    pub count: usize,
    pub a_stride: usize,
    pub b_stride: usize,
    pub c_stride: usize,
}

impl Batch {
    /// One product.
    pub const ONE: Batch = Batch {
        count: 1,
        a_stride: 0,
        b_stride: 0,
        c_stride: 0,
    };
}

/// A validated region product ready to record with [`GpuContext::run_steps`]: its pipeline,
/// uniform bytes and grid. `aliased` picks the kernel whose operands may share C's buffer.
pub(crate) struct GemmStep<'a> {
    pub pipeline: std::sync::Arc<wgpu::ComputePipeline>,
    pub buffers: Vec<&'a wgpu::Buffer>,
    pub uniform: Vec<u8>,
    pub groups: (u32, u32, u32),
}

impl GemmStep<'_> {
    pub fn dispatch(&self) -> Dispatch<'_> {
        Dispatch {
            buffers: self.buffers.clone(),
            uniform: Some(&self.uniform),
            groups: self.groups,
        }
    }
}

impl<'a> RegionGemm<'a> {
    /// The product's one dispatch (not for split products: see [`RegionGemm::prepare_steps`]).
    pub fn prepare(&self, ctx: &GpuContext, aliased: bool) -> Result<GemmStep<'a>> {
        let shape = self.check(ctx)?;
        if self.split.is_some() {
            return Err(Error::gpu(
                "matmul",
                &shape,
                "a split product takes three dispatches (prepare_steps)",
            ));
        }
        self.prepare_tiled(ctx, aliased)
    }

    /// The product's dispatches, in order: one, or for a split product the splits of A and B
    /// and the cooperative product.
    pub fn prepare_steps(&self, ctx: &GpuContext, aliased: bool) -> Result<Vec<GemmStep<'a>>> {
        let shape = self.check(ctx)?;
        match self.split {
            Some(scratch) => self.prepare_split(ctx, aliased, scratch, &shape),
            None => Ok(vec![self.prepare_tiled(ctx, aliased)?]),
        }
    }

    /// Checks the regions and options; returns the shape for messages.
    fn check(&self, ctx: &GpuContext) -> Result<String> {
        let shape = format!("region {}x{}x{}", self.m, self.n, self.k);
        let fail = |what: &str| Err(Error::gpu("matmul", &shape, what.to_string()));
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return fail("empty region product");
        }
        let bt = self.batch;
        if bt.count == 0 || bt.count > ctx.max_workgroups_per_dim() as usize {
            return fail("a batch of no products, or more than the dispatch grid allows");
        }
        // Last element each operand touches (in the batch's last product) must lie inside its
        // buffer (this is what makes the unchecked pipeline safe), and every index must fit in
        // u32.
        let last_of = |r: &Region, stride: usize, rows: usize, cols: usize| {
            r.off + (bt.count - 1) * stride + (rows - 1) * r.ld + cols
        };
        let (bm, bn) = if self.b_trans {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        for (r, stride, rows, cols) in [
            (&self.a, bt.a_stride, self.m, self.k),
            (&self.b, bt.b_stride, bm, bn),
            (&self.c, bt.c_stride, self.m, self.n),
        ] {
            if r.ld < cols || last_of(r, stride, rows, cols) > r.len || r.len > u32::MAX as usize {
                return fail("a region lies outside its buffer");
            }
        }
        let max = ctx.max_workgroups_per_dim() as usize;
        if self.m.div_ceil(TILE) > max || self.n.div_ceil(TILE) > max {
            return fail("region exceeds the dispatch grid limit");
        }
        if self.a_lower_tri && self.m != self.k {
            return fail("a lower-triangular A must be square");
        }
        if self.b_lower_tri && (self.k != self.n || self.b_trans) {
            return fail("a lower-triangular B must be square and not transposed");
        }
        Ok(shape)
    }

    /// The f32 tiled kernel's dispatch (regions checked).
    fn prepare_tiled(&self, ctx: &GpuContext, aliased: bool) -> Result<GemmStep<'a>> {
        let bt = self.batch;
        let l = if self.b_trans { Layout::NT } else { Layout::NN };
        let pipeline = if aliased {
            ctx.pipeline_from(
                &format!("matmul aliased {}", self.b_trans),
                "main",
                true,
                || aliased_source(self.b_trans),
            )?
        } else {
            ctx.pipeline_from(
                &format!("matmul {:?}x{:?} {:?}", GpuDtype::F32, GpuDtype::F32, l),
                "main",
                true,
                || tiled_source(GpuDtype::F32, GpuDtype::F32, l),
            )?
        };
        let p = self.params();
        // Every prepared step is recorded by its caller, so its work is declared here.
        let (f, b) = p.work(4, 4);
        let count = bt.count as f64;
        ctx.add_work(&pipeline, f * count, b * count);
        Ok(GemmStep {
            pipeline,
            buffers: vec![self.a.buf, self.b.buf, self.c.buf],
            uniform: bytemuck::bytes_of(&p).to_vec(),
            groups: (
                self.n.div_ceil(TILE) as u32,
                self.m.div_ceil(TILE) as u32,
                bt.count as u32,
            ),
        })
    }

    fn params(&self) -> Params {
        let bt = self.batch;
        Params {
            m: self.m as u32,
            n: self.n as u32,
            k: self.k as u32,
            accumulate: self.accumulate as u32,
            a_off: self.a.off as u32,
            lda: self.a.ld as u32,
            b_off: self.b.off as u32,
            ldb: self.b.ld as u32,
            c_off: self.c.off as u32,
            ldc: self.c.ld as u32,
            b_trans: self.b_trans as u32,
            alpha: self.alpha,
            lower: self.lower as u32,
            a_align: 0,
            b_align: 0,
            row_base: 0,
            tri: self.a_lower_tri as u32 | (self.b_lower_tri as u32) << 1,
            a_zs: bt.a_stride as u32,
            b_zs: bt.b_stride as u32,
            c_zs: bt.c_stride as u32,
            sm: 0,
            sn: 0,
            ea_off: 0,
            eb_off: 0,
        }
    }

    /// [`RegionGemm::prepare_steps`] for a split product (regions already checked).
    fn prepare_split(
        &self,
        ctx: &GpuContext,
        aliased: bool,
        scratch: &'a SplitScratch,
        shape: &str,
    ) -> Result<Vec<GemmStep<'a>>> {
        let fail = |what: &str| Err(Error::gpu("matmul_coop", shape, what.to_string()));
        if aliased || self.lower || self.a_lower_tri || self.b_lower_tri || self.batch != Batch::ONE
        {
            return fail(
                "a split product takes no aliased operands, lower triangle, triangular operand or batch",
            );
        }
        check_split(ctx, shape)?;
        let cfg = CoopConfig::SPLIT;
        let (bm, bn) = cfg.tile();
        let (lpa, kp) = split_dims(self.m, bm, self.k);
        let (lpb, _) = split_dims(self.n, bn, self.k);
        if !SplitScratch::holds(&scratch.a, lpa, kp) || !SplitScratch::holds(&scratch.b, lpb, kp) {
            return fail("the split scratch is smaller than this product");
        }
        let max = ctx.max_workgroups_per_dim() as usize;
        if lpa / 32 > max || lpb / 32 > max {
            return fail("region exceeds the dispatch grid limit");
        }
        // Trusted: each split writes inside (3 kp + 1) lp halves of its scratch (checked above)
        // and reads only elements of its region (checked by `check`).
        let p_split = ctx.pipeline("split", shaders::SPLIT, "split", true)?;
        // Line l, position t of op(A) is A[l][t]; of op(B), B[t][l] (or B[l][t] transposed).
        let (b_ls, b_ks) = if self.b_trans {
            (self.b.ld, 1)
        } else {
            (1, self.b.ld)
        };
        let sa = SplitParams::new(self.m, self.k, kp, lpa, self.a.off, self.a.ld, 1, 2);
        let sb = SplitParams::new(self.n, self.k, kp, lpb, self.b.off, b_ls, b_ks, 1);
        let mut steps = Vec::with_capacity(3);
        for (sp, src, out) in [(sa, &self.a, &scratch.a), (sb, &self.b, &scratch.b)] {
            let (lines, lp) = (sp.lines as usize, sp.lp as usize);
            let bytes = 8 * lines * self.k + 2 * split_halves(lp, kp);
            ctx.add_work(&p_split, 0.0, bytes as f64);
            steps.push(sp.step(p_split.clone(), src.buf, &out.chunks[0].buffer));
        }
        let mut p = self.params();
        p.m = lpa as u32;
        p.n = lpb as u32;
        p.k = (3 * kp) as u32;
        (p.a_off, p.lda, p.b_off, p.ldb) = (0, lpa as u32, 0, lpb as u32);
        (p.sm, p.sn) = (self.m as u32, self.n as u32);
        (p.ea_off, p.eb_off) = (sa.e_off, sb.e_off);
        p.set_align();
        let exact = p.exact(cfg.tile(), cfg.bk);
        let (pipeline, _) = coop_pipeline(
            ctx,
            GpuDtype::F16,
            GpuDtype::F16,
            Layout::TN,
            cfg,
            exact,
            true,
        )?;
        let (f, b) = p.work(2, 2);
        ctx.add_work(&pipeline, f, b);
        steps.push(GemmStep {
            pipeline,
            buffers: vec![
                &scratch.a.chunks[0].buffer,
                &scratch.b.chunks[0].buffer,
                self.c.buf,
            ],
            uniform: bytemuck::bytes_of(&p).to_vec(),
            groups: ((lpb / bn) as u32, (lpa / bm) as u32, 1),
        });
        Ok(steps)
    }
}

/// One region product of [`RegionGemm`] on single-chunk f32 tensors, for the tests and
/// benchmarks of the kernels behind GPTQ's lazy updates and the dense linear algebra: C region
/// (m x n at `c_off`, leading dimension `ldc`) = [C +] alpha · A region · op(B region).
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct RegionProduct {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_off: usize,
    pub lda: usize,
    pub b_off: usize,
    pub ldb: usize,
    pub c_off: usize,
    pub ldc: usize,
    pub b_trans: bool,
    pub alpha: f32,
    pub accumulate: bool,
    /// The cooperative kernel's split mode instead of the f32 tiled kernel.
    pub split: bool,
}

impl RegionProduct {
    /// The dispatches of this product on `a`, `b` and `c` (each f32 in one chunk; the regions
    /// are checked to fit). A split product splits its operands into `scratch`, which must be
    /// given and hold them ([`SplitScratch::new`] with this m, n, k).
    pub(crate) fn steps<'a>(
        &self,
        ctx: &GpuContext,
        a: &'a GpuTensor,
        b: &'a GpuTensor,
        c: &'a GpuTensor,
        scratch: Option<&'a SplitScratch>,
    ) -> Result<Vec<GemmStep<'a>>> {
        fn region(t: &GpuTensor, off: usize, ld: usize) -> Result<Region<'_>> {
            if t.dtype != GpuDtype::F32 || t.chunks.len() != 1 {
                return Err(Error::Shape {
                    op: "region product".into(),
                    expected: "an f32 tensor in one chunk".into(),
                    got: t.shape_str(),
                });
            }
            Ok(Region {
                buf: &t.chunks[0].buffer,
                len: t.rows * t.cols,
                off,
                ld,
            })
        }
        let split = match (self.split, scratch) {
            (true, None) => {
                return Err(Error::gpu(
                    "matmul_coop",
                    format!("region {}x{}x{}", self.m, self.n, self.k),
                    "a split product needs a split scratch",
                ));
            }
            (true, s) => s,
            (false, _) => None,
        };
        RegionGemm {
            a: region(a, self.a_off, self.lda)?,
            b: region(b, self.b_off, self.ldb)?,
            c: region(c, self.c_off, self.ldc)?,
            m: self.m,
            n: self.n,
            k: self.k,
            b_trans: self.b_trans,
            alpha: self.alpha,
            accumulate: self.accumulate,
            lower: false,
            a_lower_tri: false,
            b_lower_tri: false,
            batch: Batch::ONE,
            split,
        }
        .prepare_steps(ctx, false)
    }
}

/// Runs `r` on `a`, `b` and `c` (each f32 in one chunk; the regions are checked to fit).
#[doc(hidden)]
pub fn region_product(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    c: &GpuTensor,
    r: RegionProduct,
) -> Result<()> {
    let scratch = if r.split {
        Some(SplitScratch::new(ctx, r.m, r.n, r.k)?)
    } else {
        None
    };
    let steps = r.steps(ctx, a, b, c, scratch.as_ref())?;
    run_gemm_steps(
        ctx,
        "region product",
        &format!("{}x{}x{}", r.m, r.n, r.k),
        &steps,
    )
}

/// Records `steps` in order as one submission ([`GpuContext::run_steps`]).
pub(crate) fn run_gemm_steps(
    ctx: &GpuContext,
    kernel: &str,
    shape: &str,
    steps: &[GemmStep],
) -> Result<()> {
    let ds: Vec<Dispatch> = steps.iter().map(|s| s.dispatch()).collect();
    let list: Vec<(&wgpu::ComputePipeline, &Dispatch)> = steps
        .iter()
        .zip(&ds)
        .map(|(s, d)| (&*s.pipeline, d))
        .collect();
    ctx.run_steps(kernel, shape, &list)
}

/// One run of `shaders/split.wgsl` alone, for its test against `reference::matmul::split_operand`:
/// line `l`, position `t` of `src` (f32, one chunk) is element `off + l * ls + t * ks`; the
/// output's halves as f16 bits (three segments of kp x lp, then lp exponents; lp and kp as a
/// split product pads them: `lines` to the split tile's rows, `k` to its slice depth).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn split_operand(
    ctx: &GpuContext,
    src: &GpuTensor,
    lines: usize,
    k: usize,
    off: usize,
    ls: usize,
    ks: usize,
    lo_seg: u32,
) -> Result<(Vec<u16>, usize, usize)> {
    let shape = format!("split {lines}x{k}");
    if !ctx.caps.shader_f16 {
        return Err(Error::gpu(
            "split",
            &shape,
            format!("adapter {} lacks f16 shaders", ctx.adapter),
        ));
    }
    if src.dtype != GpuDtype::F32 || src.chunks.len() != 1 || lines == 0 || k == 0 {
        return Err(Error::Shape {
            op: "split".into(),
            expected: "an f32 tensor in one chunk and a non-empty operand".into(),
            got: src.shape_str(),
        });
    }
    if off + (lines - 1) * ls + (k - 1) * ks >= src.rows * src.cols {
        return Err(Error::gpu(
            "split",
            &shape,
            "the operand lies outside its buffer",
        ));
    }
    let (lp, kp) = split_dims(lines, CoopConfig::SPLIT.tile().0, k);
    let out = GpuTensor::empty(ctx, 3 * kp + 1, lp, GpuDtype::F16)?;
    out.fill_u32(ctx, 0x7e00_7e00);
    let sp = SplitParams::new(lines, k, kp, lp, off, ls, ks, lo_seg);
    let pipe = ctx.pipeline("split", shaders::SPLIT, "split", false)?;
    let step = sp.step(pipe, &src.chunks[0].buffer, &out.chunks[0].buffer);
    run_gemm_steps(ctx, "split", &shape, &[step])?;
    let bytes = out.to_bytes(ctx)?;
    Ok((bytemuck::pod_collect_to_vec(&bytes), lp, kp))
}
