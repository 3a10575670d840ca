//! Quantized matmul for the block formats of the default model (Q4_0, Q4_1, Q8_0):
//! y = x·Wᵀ, each weight block unpacked once per tile of input rows, parallel over output rows.
//!
//! Three precisions ([`ActivationPrecision`]):
//! - `Int16` and `Int8`: each activation row is quantized once per matmul per
//!   32-value block (an f32 scale per block, plus the block's sum), and the dot products run
//!   on integers. Int16 runs on weights re-laid out in 16-row strips (`strips`): `vpdpwssd`
//!   with AVX-512 VNNI, `vpmaddwd` with AVX2 (`strips_avx2`), the block's float work shared by
//!   the strip's rows. Int8, what llama.cpp does, runs on the GGUF blocks (`int_x86`:
//!   `vpdpbusd`, or `vpmaddubsw`+`vpmaddwd`). Int16 has 1/258 of int8's rounding error; their
//!   effect on the real model is measured in BENCHMARKS.md ("Decode kernels").
//! - `F32`: activations stay f32 and blocks are unpacked to f32 (AVX2+FMA): the exact path,
//!   equal to x·Wᵀ on the dequantized weights up to summation order.
//! - `Auto` (default): int16 on strips wherever the CPU has AVX2 (the fastest path at every
//!   row count, on AVX2 as on AVX-512 VNNI); on the portable scalar kernels int16 for a few
//!   rows (decode), f32 for many (batched decode, prefill).
//!
//! Why our own kernel rather than candle's `QMatMul`: candle 0.11's Q4_1 dot product is scalar,
//! it re-reads every weight block for every row of a batch, and its activation blocks carry f16
//! scales. Instruction sets are picked at run time ([`Isa::detect`]) so the binary stays
//! portable; every path can be forced ([`QWeight::matmul_with`]) so tests cover each one.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod int_x86;
mod scalar;
mod strips;
#[cfg(target_arch = "x86_64")]
mod strips_avx2;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

/// [`BlockFormat`] as a const-generic parameter of the SIMD kernels, so the per-block format
/// branches vanish from their hot loops (left in, LLVM also spilled accumulators to the stack).
#[cfg(target_arch = "x86_64")]
mod format_id {
    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q8_0: u8 = 2;

    #[inline(always)]
    pub const fn block_bytes(f: u8) -> usize {
        match f {
            Q4_0 => 18,
            Q4_1 => 20,
            _ => 34,
        }
    }
}

/// Values per quantization block (all three weight formats, and the int8 activation blocks).
const QK: usize = 32;

/// Below this many multiply-adds a matmul runs on the calling thread: waking the pool costs
/// more than the work (a 192x576 k/v projection of one row is ~4 µs of arithmetic).
const PARALLEL_MIN_MACS: usize = 1 << 18;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl BlockFormat {
    fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes per block of 32 values.
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// What the activations are multiplied as. Measured on the default model (BENCHMARKS.md,
/// "Decode kernels"): `Int16` keeps the output of the exact path (PEFT reference tokens
/// 12/12), and its strip kernels are the fastest path at every row count with AVX2 and with
/// AVX-512 VNNI. Without AVX2 (the scalar kernels) f32 is as fast from about four rows on;
/// `Auto`, the default, takes the faster of the two exact-enough paths per call. `Int8` is
/// llama.cpp's scheme and moves near-tied greedy choices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActivationPrecision {
    /// `Int16` with AVX2 (strips); without it `Int16` for fewer than
    /// [`AUTO_F32_FROM_ROWS`] input rows, `F32` from there on.
    #[default]
    Auto,
    /// int8 per 32-value block with an f32 scale (llama.cpp's scheme); integer dot products.
    Int8,
    /// int16 per 32-value block with an f32 scale: integer dot products (`vpmaddwd`,
    /// `vpdpwssd`) with 1/258 of int8's rounding error.
    Int16,
    /// f32 activations against f32-unpacked blocks: the exact path.
    F32,
}

/// Where `Auto` switches from int16 to f32 activations on the scalar kernels, the path of CPUs
/// without AVX2 (`kernel_speed`: from 4 rows the scalar f32 kernel was at least as fast).
pub const AUTO_F32_FROM_ROWS: usize = 4;

impl ActivationPrecision {
    /// The concrete precision for a matmul over `n` input rows.
    pub fn for_rows(self, n: usize) -> Self {
        match self {
            Self::Auto if n < AUTO_F32_FROM_ROWS => Self::Int16,
            Self::Auto => Self::F32,
            p => p,
        }
    }
}

impl std::str::FromStr for ActivationPrecision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "int8" => Ok(Self::Int8),
            "int16" => Ok(Self::Int16),
            "f32" => Ok(Self::F32),
            _ => Err(format!(
                "activation precision {s:?}: expected \"auto\", \"int8\", \"int16\" or \"f32\""
            )),
        }
    }
}

/// The instruction set a kernel runs on. Each is a complete implementation; `detect` picks
/// the best one the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C: int16 on 8-row halves of strips with `vpmaddwd`, int8 with
    /// `vpmaddubsw`, f32 with 256-bit FMAs.
    Avx2,
    /// The AVX2 set plus AVX-512F, BW, VL and VNNI: the integer paths use `vpdpbusd` /
    /// `vpdpwssd` (512-bit on strips for many rows), the f32 path 512-bit FMAs.
    Avx512Vnni,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            [Isa::Avx512Vnni, Isa::Avx2]
                .into_iter()
                .find(|i| i.is_available())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// Whether this CPU can run `self`.
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => avx2,
                Isa::Avx512Vnni => {
                    avx2 && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                        && is_x86_feature_detected!("avx512vl")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }
}

/// A frozen quantized weight [rows, cols] in GGUF block layout.
#[derive(Debug)]
pub struct QWeight {
    format: BlockFormat,
    /// The GGUF blocks, for the kernels that read that layout. Where strips exist they are
    /// rebuilt from them on first use (the f32 and int8 paths are opt-in), so the default
    /// path holds one copy of the weights, not two.
    data: OnceLock<Vec<u8>>,
    rows: usize,
    cols: usize,
    /// The same weight in 16-row strips (see `strips`); built where the CPU has a strip
    /// kernel (AVX2 or better).
    strips: Option<strips::Strips>,
}

/// Activation rows quantized to int8 per 32-value block: `q` [n, cols], and per block
/// (`[n, cols/32]`) the scale `d` (x ≈ d·q) and `sum` = d·Σq, the block sum of the values the
/// integer dot product actually sees. The offset terms (Q4_1's min, Q4_0's −8, the +128 that
/// makes Q8_0 weights unsigned for `vpdpbusd`) multiply this sum, so the result is exactly
/// the dot product of the dequantized weights with the rounded activations.
#[derive(Default)]
pub(crate) struct QuantRows {
    /// int16 activations (`q16`) rather than int8 (`q`); the other buffer is stale.
    wide: bool,
    q: Vec<i8>,
    q16: Vec<i16>,
    d: Vec<f32>,
    sum: Vec<f32>,
}

/// Portable per-block quantization: each 32-value block scaled so its largest magnitude maps
/// to `qmax`, rounded to nearest (ties to even); `d` gets the scale and `sum` the scale times
/// the sum of the rounded values (the term the weight offsets multiply).
fn quantize_blocks_scalar<T>(
    x: &[f32],
    q: &mut [T],
    d: &mut [f32],
    sum: &mut [f32],
    qmax: f32,
    narrow: impl Fn(i32) -> T,
) {
    for (((xb, qb), d), s) in x
        .chunks_exact(QK)
        .zip(q.chunks_exact_mut(QK))
        .zip(d.iter_mut())
        .zip(sum.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / qmax;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut isum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            // Round to nearest (ties to even) without SSE4.1's `roundps`, which the portable
            // baseline lacks (`f32::round` would be a libm call per value): adding 1.5·2²³
            // pushes the fraction bits out. |v·inv| ≤ qmax, far inside the trick's range.
            const MAGIC: f32 = 12_582_912.0;
            let r = ((v * inv + MAGIC) - MAGIC) as i32;
            *q = narrow(r);
            isum += r;
        }
        *d = scale;
        *s = scale * isum as f32;
    }
}

impl QuantRows {
    /// Quantizes rows of `cols` values (`cols` a multiple of 32), reusing the buffers.
    fn quantize(&mut self, x: &[f32], cols: usize, isa: Isa, wide: bool) {
        debug_assert_eq!(x.len() % cols, 0);
        let nb_total = x.len() / QK;
        self.wide = wide;
        self.d.resize(nb_total, 0.0);
        self.sum.resize(nb_total, 0.0);
        if wide {
            self.q16.resize(x.len(), 0);
            self.quantize16(x, isa);
            return;
        }
        self.q.resize(x.len(), 0);
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            // SAFETY: `isa` is available (checked by the caller) and includes AVX2; the
            // buffers were just sized to x.
            unsafe { int_x86::quantize_blocks(x, &mut self.q, &mut self.d, &mut self.sum) };
            return;
        }
        let _ = isa;
        quantize_blocks_scalar(x, &mut self.q, &mut self.d, &mut self.sum, 127.0, |r| {
            r as i8
        });
    }

    /// The int16 half of [`Self::quantize`] (buffers already sized).
    fn quantize16(&mut self, x: &[f32], isa: Isa) {
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            // SAFETY: as in `quantize`.
            unsafe { int_x86::quantize_blocks16(x, &mut self.q16, &mut self.d, &mut self.sum) };
            return;
        }
        let _ = isa;
        quantize_blocks_scalar(x, &mut self.q16, &mut self.d, &mut self.sum, 32767.0, |r| {
            r as i16
        });
    }

    fn row(&self, r: usize, cols: usize) -> ActRow<'_> {
        let nb = cols / QK;
        let span = r * cols..(r + 1) * cols;
        ActRow {
            q: if self.wide {
                &[]
            } else {
                &self.q[span.clone()]
            },
            q16: if self.wide { &self.q16[span] } else { &[] },
            d: &self.d[r * nb..(r + 1) * nb],
            sum: &self.sum[r * nb..(r + 1) * nb],
        }
    }
}

/// Consecutive quantized activation rows, as the kernels read them.
#[derive(Clone, Copy)]
pub(crate) struct ActRow<'a> {
    /// int8 values, or empty for int16 rows.
    q: &'a [i8],
    /// int16 values, or empty for int8 rows.
    q16: &'a [i16],
    d: &'a [f32],
    sum: &'a [f32],
}

thread_local! {
    /// Per-thread activation buffers: a decode step runs ~200 matmuls, none of which should
    /// allocate.
    static QUANT_ROWS: RefCell<QuantRows> = RefCell::new(QuantRows::default());
}

impl QWeight {
    /// The weight as a kernel operand, or `None` for formats this kernel does not cover.
    pub fn from_qtensor(w: &QTensor) -> Result<Option<Self>> {
        let Some(format) = BlockFormat::from_ggml(w.dtype()) else {
            return Ok(None);
        };
        let (rows, cols) = w.shape().dims2()?;
        if cols % QK != 0 {
            return Ok(None);
        }
        let data = w.data()?.into_owned();
        if data.len() != rows * cols / QK * format.block_bytes() {
            candle_core::bail!(
                "quantized weight has {} bytes, expected {}",
                data.len(),
                rows * cols / QK * format.block_bytes()
            );
        }
        let strips =
            (Isa::detect() >= Isa::Avx2).then(|| strips::Strips::build(format, &data, rows, cols));
        let gguf = OnceLock::new();
        if strips.is_none() {
            let _ = gguf.set(data);
        }
        Ok(Some(Self {
            format,
            data: gguf,
            rows,
            cols,
            strips,
        }))
    }

    /// The weight's GGUF blocks (rebuilt from the strips on first use where those exist).
    fn gguf(&self) -> &[u8] {
        self.data.get_or_init(|| match &self.strips {
            Some(s) => s.to_gguf(self.format, self.rows, self.cols),
            None => Vec::new(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// Bytes held (for memory accounting).
    pub fn size_bytes(&self) -> usize {
        self.data.get().map_or(0, Vec::len) + self.strips.as_ref().map_or(0, |s| s.data.len())
    }

    /// `xs` [n, cols] f32 -> [n, rows] f32, with the activations at `precision`.
    pub fn forward(&self, xs: &Tensor, precision: ActivationPrecision) -> Result<Tensor> {
        xs.apply_op1_no_bwd(&QMatmulOp { w: self, precision })
    }

    /// Computes out[r][j] = Σ_k x[r][k]·W[j][k] for `n` rows of `x`, on the best instruction
    /// set this CPU has.
    pub fn matmul_slice(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        precision: ActivationPrecision,
    ) {
        self.matmul_with(x, n, out, precision, Isa::detect());
    }

    /// As [`Self::matmul_slice`] on a chosen instruction set; one the CPU lacks falls back to
    /// the best it has (never to undefined behaviour).
    pub fn matmul_with(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        precision: ActivationPrecision,
        isa: Isa,
    ) {
        matmul_multi(&[self], x, n, &mut [out], precision, isa);
    }

    /// The weight as dense f32 rows [rows, cols] (row-major), unpacked in parallel. Training
    /// multiplies many rows at once, where a dense GEMM on a temporary copy beats the block kernel.
    pub fn dequantize(&self) -> Vec<f32> {
        // A temporary GGUF copy where only strips are held: training should not leave a
        // second copy of every weight behind.
        let rebuilt;
        let data: &[u8] = match (self.data.get(), &self.strips) {
            (Some(d), _) => d,
            (None, Some(s)) => {
                rebuilt = s.to_gguf(self.format, self.rows, self.cols);
                &rebuilt
            }
            (None, None) => &[],
        };
        let row_bytes = self.cols / QK * self.format.block_bytes();
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(j, dst)| {
                let w = &data[j * row_bytes..(j + 1) * row_bytes];
                let mut block = [0f32; QK];
                for (b, d) in w
                    .chunks_exact(self.format.block_bytes())
                    .zip(dst.chunks_exact_mut(QK))
                {
                    dequant_block(self.format, b, &mut block);
                    d.copy_from_slice(&block);
                }
            });
        out
    }
}

/// `x` [n, cols] against several weights of the same width at once (q/k/v, gate/up): the
/// activations are quantized once and every weight's rows share one parallel region, so a
/// decode step pays one fork-join per group instead of one per matrix. `outs[i]` receives
/// [n, ws[i].rows()].
pub fn matmul_multi(
    ws: &[&QWeight],
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
    precision: ActivationPrecision,
    isa: Isa,
) {
    assert_eq!(
        ws.len(),
        outs.len(),
        "quantized matmul: one output per weight"
    );
    let Some(cols) = ws.first().map(|w| w.cols) else {
        return;
    };
    assert_eq!(x.len(), n * cols, "quantized matmul: input size");
    for (w, o) in ws.iter().zip(outs.iter()) {
        assert_eq!(
            w.cols, cols,
            "quantized matmul: weights of different widths"
        );
        assert_eq!(o.len(), n * w.rows, "quantized matmul: output size");
    }
    let outs: Vec<SharedOut> = outs.iter_mut().map(|o| SharedOut(o.as_mut_ptr())).collect();
    let isa = if isa.is_available() {
        isa
    } else {
        Isa::detect()
    };
    #[cfg(target_arch = "x86_64")]
    if matches!(
        precision,
        ActivationPrecision::Auto | ActivationPrecision::Int16
    ) && isa >= Isa::Avx2
        && ws.iter().all(|w| w.strips.is_some())
    {
        with_quantized(x, cols, isa, true, |acts| {
            // SAFETY: `isa` is available and at least AVX2; every weight has strips; the
            // outputs were checked to hold n·rows_i values.
            unsafe { strips::matmul(ws, acts, n, cols, &outs, isa) }
        });
        return;
    }
    match precision.for_rows(n) {
        ActivationPrecision::Auto | ActivationPrecision::F32 => {
            par_rows(ws, &outs, n, f32_rows_per_call(isa), |f, w, nw, dst| {
                dot_rows_f32(f, w, nw, x, cols, dst, isa)
            })
        }
        ActivationPrecision::Int8 | ActivationPrecision::Int16 => {
            let int16 = precision.for_rows(n) == ActivationPrecision::Int16;
            with_quantized(x, cols, isa, int16, |acts| {
                par_rows(ws, &outs, n, INT_ROWS_PER_CALL, |f, w, nw, dst| {
                    dot_rows_int(f, w, nw, acts, cols, dst, isa)
                })
            })
        }
    }
}

/// Runs `f` on `x` ([n, cols]) quantized per block to int16 (`wide`) or int8, in this
/// thread's reusable buffers.
fn with_quantized(x: &[f32], cols: usize, isa: Isa, wide: bool, f: impl FnOnce(&QuantRows)) {
    QUANT_ROWS.with(|cell| {
        // A matmul never nests inside another on one thread, so the borrow is free; if it
        // ever were taken, fall back to a fresh buffer rather than panic.
        let mut fresh = QuantRows::default();
        let mut guard = cell.try_borrow_mut();
        let acts = match guard.as_deref_mut() {
            Ok(a) => a,
            Err(_) => &mut fresh,
        };
        acts.quantize(x, cols, isa, wide);
        f(acts)
    })
}

/// [`matmul_multi`] on tensors: `xs` [n, cols] f32 -> one [n, rows_i] tensor per weight.
pub fn forward_multi(
    ws: &[&QWeight],
    xs: &Tensor,
    precision: ActivationPrecision,
) -> Result<Vec<Tensor>> {
    let (n, cols) = xs.dims2()?;
    if let Some(w) = ws.iter().find(|w| w.cols != cols) {
        candle_core::bail!(
            "quantized matmul: input has {cols} columns, weight has {}",
            w.cols
        );
    }
    let xs = xs.contiguous()?;
    let (storage, layout) = xs.storage_and_layout();
    let x = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => candle_core::bail!("quantized matmul expects contiguous f32 activations on the CPU"),
    };
    let mut bufs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; n * w.rows]).collect();
    let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    matmul_multi(ws, x, n, &mut outs, precision, Isa::detect());
    drop(storage);
    bufs.into_iter()
        .zip(ws)
        .map(|(b, w)| Tensor::from_vec(b, (n, w.rows), xs.device()))
        .collect()
}

/// Runs `dot(format, weight_rows_bytes, nw, dst)` over every weight row j of every weight i,
/// `nw` (≤ `max_nw`) consecutive rows at a time, where `dst[k·n + r]` receives input row r's
/// result for row j+k, which belongs at `outs[i][r·rows_i + j + k]`; split over the rayon pool
/// by output rows of all weights together.
fn par_rows<F>(ws: &[&QWeight], outs: &[SharedOut], n: usize, max_nw: usize, dot: F)
where
    F: Fn(BlockFormat, &[u8], usize, &mut [f32]) + Sync,
{
    let total: usize = ws.iter().map(|w| w.rows).sum();
    // Global rows [g0, g1) for every input row. Tasks write disjoint output columns, so they
    // can share the outputs (through raw pointers: a slice cannot express a column range).
    let run = |g0: usize, g1: usize| {
        let mut small = [0f32; 64];
        let mut big = Vec::new();
        let dst = if n * max_nw <= small.len() {
            &mut small[..n * max_nw]
        } else {
            big.resize(n * max_nw, 0f32);
            &mut big[..]
        };
        // Results of up to SPAN consecutive weight rows for every input row, gathered here
        // and then written out as one contiguous run per input row: storing each result
        // straight into the output, a column at a time, cost ~3% of a batched decode step
        // (the lm_head's output is 1.5 MB at 8 rows, so every strided store missed).
        const SPAN: usize = 64;
        let mut tile = vec![0f32; n * SPAN];
        let mut base = 0;
        for (w, out) in ws.iter().zip(outs) {
            let (lo, hi) = (g0.max(base), g1.min(base + w.rows));
            let row_bytes = w.cols / QK * w.format.block_bytes();
            let data = w.gguf();
            let (lo, hi) = (lo.saturating_sub(base), hi.saturating_sub(base));
            if n == 1 && lo < hi {
                // One input row: weight row j's result is output j, so the kernel writes the
                // output directly, with no gather through `tile` (5% of a single-stream step).
                // SAFETY: lo..hi is inside this output (rows long, checked by matmul_multi) and
                // no other task writes these columns.
                let out = unsafe { std::slice::from_raw_parts_mut(out.get().add(lo), hi - lo) };
                for (c, dst) in out.chunks_mut(max_nw).enumerate() {
                    let j = lo + c * max_nw;
                    dot(
                        w.format,
                        &data[j * row_bytes..(j + dst.len()) * row_bytes],
                        dst.len(),
                        dst,
                    );
                }
                base += w.rows;
                continue;
            }
            let mut span_start = lo;
            while span_start < hi {
                let span_end = (span_start + SPAN).min(hi);
                let span = span_end - span_start;
                let mut j = span_start;
                while j < span_end {
                    let nw = max_nw.min(span_end - j);
                    let dst = &mut dst[..nw * n];
                    dot(
                        w.format,
                        &data[j * row_bytes..(j + nw) * row_bytes],
                        nw,
                        dst,
                    );
                    for (k, col) in dst.chunks_exact(n).enumerate() {
                        for (r, v) in col.iter().enumerate() {
                            tile[r * SPAN + j - span_start + k] = *v;
                        }
                    }
                    j += nw;
                }
                for (r, t) in tile.chunks_exact(SPAN).enumerate() {
                    // SAFETY: r < n and span_start + span <= w.rows, so the run is inside
                    // this output (n·rows long, checked by matmul_multi); no other task
                    // writes these columns.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            t.as_ptr(),
                            out.get().add(r * w.rows + span_start),
                            span,
                        )
                    };
                }
                span_start = span_end;
            }
            base += w.rows;
        }
    };
    let macs = total * ws.first().map_or(0, |w| w.cols) * n;
    if macs < PARALLEL_MIN_MACS || rayon::current_num_threads() == 1 {
        run(0, total);
        return;
    }
    // A few tasks per thread: enough to balance, few enough that scheduling stays cheap. Even
    // sized, so paired-row kernels keep their pairs.
    let chunk = total
        .div_ceil(4 * rayon::current_num_threads())
        .max(16)
        .next_multiple_of(2);
    (0..total.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| run(c * chunk, ((c + 1) * chunk).min(total)));
}

/// The output buffer shared by the tasks of one matmul, each writing its own columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements (see `par_rows`), and the buffer outlives the tasks.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// A method rather than field access, so closures capture the whole (Sync) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The kernel as a candle op (no backward: the weight is frozen and training multiplies by a
/// dequantized copy instead).
struct QMatmulOp<'a> {
    w: &'a QWeight,
    precision: ActivationPrecision,
}

impl CustomOp1 for QMatmulOp<'_> {
    fn name(&self) -> &'static str {
        "adapterd-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match storage {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("quantized matmul expects f32 activations"),
        };
        let (n, cols) = layout.shape().dims2()?;
        if cols != self.w.cols {
            candle_core::bail!(
                "quantized matmul: input has {cols} columns, weight has {}",
                self.w.cols
            );
        }
        let x = match layout.contiguous_offsets() {
            Some((a, b)) => &x[a..b],
            None => candle_core::bail!("quantized matmul expects a contiguous input"),
        };
        let mut out = vec![0f32; n * self.w.rows];
        self.w.matmul_slice(x, n, &mut out, self.precision);
        Ok((CpuStorage::F32(out), Shape::from((n, self.w.rows))))
    }
}

/// Weight rows the f32 kernel of `isa` takes per call (see [`dot_rows_f32`]).
fn f32_rows_per_call(isa: Isa) -> usize {
    if isa >= Isa::Avx512Vnni {
        2
    } else {
        1
    }
}

/// `nw` consecutive weight rows `w` (all their blocks; nw ≤ [`f32_rows_per_call`]) against
/// every f32 row of `x`; results into `dst[k·n + r]` for weight row k and input row r.
fn dot_rows_f32(
    format: BlockFormat,
    w: &[u8],
    nw: usize,
    x: &[f32],
    cols: usize,
    dst: &mut [f32],
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni {
        // SAFETY: `isa` was checked available, and it includes AVX-512F and F16C.
        unsafe { avx512::dot_rows(format, w, nw, x, cols, dst) };
        return;
    }
    debug_assert_eq!(nw, 1);
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `isa` was checked available, and every ISA above Scalar includes AVX2,
        // FMA and F16C.
        unsafe { avx2::dot_rows(format, w, x, cols, dst) };
        return;
    }
    let _ = isa;
    scalar::dot_rows_f32(format, w, x, cols, dst);
}

/// Weight rows the integer kernels take per call: one call per weight row cost ~8% of a
/// single-stream decode step in call overhead (measured with perf on AVX2), and the kernel
/// takes a single activation row against weight rows in pairs.
const INT_ROWS_PER_CALL: usize = 8;

/// `nw` consecutive weight rows `w` against every int8 or int16 row of `acts`; weight row
/// k's results into `dst[k·n + r]`.
fn dot_rows_int(
    format: BlockFormat,
    w: &[u8],
    nw: usize,
    acts: &QuantRows,
    cols: usize,
    dst: &mut [f32],
    isa: Isa,
) {
    // Int16 rows come here only without AVX2 (with it they run on strips); the scalar arm
    // still computes them should that ever change.
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: checked available by the caller; `w` holds nw rows and `dst` nw·n values.
        Isa::Avx512Vnni if !acts.wide => unsafe {
            int_x86::dot_rows_vnni(format, w, nw, acts, cols, dst)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 if !acts.wide => unsafe {
            int_x86::dot_rows_avx2(format, w, nw, acts, cols, dst)
        },
        _ => {
            let (n, row_bytes) = (dst.len() / nw.max(1), w.len() / nw.max(1));
            for (wk, dk) in w
                .chunks_exact(row_bytes.max(1))
                .zip(dst.chunks_exact_mut(n.max(1)))
            {
                for (r, d) in dk.iter_mut().enumerate() {
                    *d = scalar::dot_int(format, wk, acts.row(r, cols));
                }
            }
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantizes one block into 32 floats.
fn dequant_block(format: BlockFormat, b: &[u8], out: &mut [f32; QK]) {
    match format {
        BlockFormat::Q4_0 => {
            let d = f16_at(b, 0);
            for i in 0..16 {
                let q = b[2 + i];
                out[i] = ((q & 0x0F) as f32 - 8.0) * d;
                out[i + 16] = ((q >> 4) as f32 - 8.0) * d;
            }
        }
        BlockFormat::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for i in 0..16 {
                let q = b[4 + i];
                out[i] = (q & 0x0F) as f32 * d + m;
                out[i + 16] = (q >> 4) as f32 * d + m;
            }
        }
        BlockFormat::Q8_0 => {
            let d = f16_at(b, 0);
            for i in 0..QK {
                out[i] = (b[2 + i] as i8) as f32 * d;
            }
        }
    }
}
