//! Adds the low-rank deltas of a batch's adapter groups to a projection's output in one pass
//! on the CPU: for each row of each group, t = scale·A·x (rank values), then y += B·t, written
//! into the projection's output in place.
//!
//! Why not candle ops: per adapted projection and group, index_select, two matmuls, a scale and
//! index_add are five dispatches and five allocations for a few thousand multiply-adds; at 7
//! modules × 30 layers that was ~1000 ops per decode step and cost a third of single-stream
//! speed (BENCHMARKS.md). Other devices keep the tensor path.
//!
//! With many distinct adapters in a step the pass is bound by reading A and B (rank 16 on all
//! seven modules is ~20 MB of f32 per adapter, more than the base's shared 92 MB at 8
//! adapters), so it reads f16 copies where the parser made them (half the bytes) and splits
//! the (group, block of rows) items over the rayon pool the forward already runs on. A block is
//! up to sixteen rows of one group (a prompt, or streams sharing an adapter): A is read and
//! widened once for every four of them, and from four rows on B is read once for the whole
//! block, eight outputs at a time widened and transposed so each row needs only broadcasts
//! and FMAs (one row reads B in order with horizontal sums instead, which costs less for one).

use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Storage, Tensor};
use half::f16;
use rayon::prelude::*;

use super::LoraPair;
use int8::Int8Ab;

mod int8;

/// Below this many multiply-adds a call stays on the calling thread: one rank-16 adapter on
/// one row of q_proj is ~18k, where handing work to another thread costs more than it saves.
const PARALLEL_MIN_MACS: usize = 64 * 1024;

/// Which inner loops run: explicit AVX2/FMA/F16C, or portable code the compiler vectorises
/// for the target's baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Avx2,
    Portable,
}

impl Kernel {
    /// The best kernel this CPU runs (detected once).
    pub fn detect() -> Self {
        static DETECTED: OnceLock<Kernel> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            if Kernel::Avx2.is_available() {
                Kernel::Avx2
            } else {
                Kernel::Portable
            }
        })
    }

    pub fn is_available(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => false,
        }
    }
}

/// Adds scale·B(A·xs[r]) to row `r` of `ys` [n, out], for every `(pair, rows)` and every
/// listed row `r` of `xs` [n, in], in place. CPU, f32 activations, A/B in f32 or f16.
///
/// Returns `false` (nothing done) when a tensor is elsewhere or in another form, so the caller
/// can use the tensor path. `ys` is changed in place, so it must be a tensor the caller owns
/// (a projection's fresh output): every tensor sharing its storage would see the change.
pub fn add_deltas_cpu(ys: &Tensor, xs: &Tensor, groups: &[(&LoraPair, &[u32])]) -> Result<bool> {
    add_deltas_cpu_with(ys, xs, groups, Kernel::detect(), true)
}

/// [`add_deltas_cpu`] with the kernel and threading chosen by the caller (for measurements
/// and tests); a kernel this CPU lacks falls back to the portable one.
pub fn add_deltas_cpu_with(
    ys: &Tensor,
    xs: &Tensor,
    groups: &[(&LoraPair, &[u32])],
    kernel: Kernel,
    parallel: bool,
) -> Result<bool> {
    // The read guards of every A and B live until the pass is done.
    let mut guards = Vec::with_capacity(groups.len());
    for (pair, _) in groups {
        let (rank, a_in) = pair.a.dims2()?;
        let (b_out, b_rank) = pair.b.dims2()?;
        if b_rank != rank {
            candle_core::bail!(
                "lora delta: A [{rank}, {a_in}] / B [{b_out}, {b_rank}] do not pair"
            );
        }
        guards.push((pair.a.storage_and_layout(), pair.b.storage_and_layout()));
    }
    let mut pairs = Vec::with_capacity(groups.len());
    for (((a_store, a_layout), (b_store, b_layout)), (pair, rows)) in guards.iter().zip(groups) {
        let (Some((a0, a1)), Some((b0, b1))) =
            (a_layout.contiguous_offsets(), b_layout.contiguous_offsets())
        else {
            return Ok(false);
        };
        let rank = pair.a.dims()[0];
        let scale = pair.scale as f32;
        let cpu = match (&**a_store, &**b_store) {
            (Storage::Cpu(CpuStorage::F32(a)), Storage::Cpu(CpuStorage::F32(b))) => CpuPair {
                ab: Ab::Dense(Dense::F32 {
                    a: &a[a0..a1],
                    b: &b[b0..b1],
                }),
                rank,
                scale,
            },
            (Storage::Cpu(CpuStorage::F16(a)), Storage::Cpu(CpuStorage::F16(b))) => {
                CpuPair::f16(&a[a0..a1], &b[b0..b1], rank, scale)
            }
            (Storage::Cpu(CpuStorage::U8(a)), Storage::Cpu(CpuStorage::U8(b))) => {
                let Some(scales) = &pair.int8 else {
                    return Ok(false);
                };
                if scales.a.len() != rank || scales.b.len() != rank {
                    candle_core::bail!("lora delta: int8 scales do not match rank {rank}");
                }
                CpuPair::int8(
                    bytemuck::cast_slice(&a[a0..a1]),
                    &scales.a,
                    bytemuck::cast_slice(&b[b0..b1]),
                    &scales.b,
                    scale,
                )
            }
            _ => return Ok(false),
        };
        pairs.push((cpu, *rows));
    }
    add_pairs_cpu_with(ys, xs, &pairs, kernel, parallel)
}

/// One adapted projection of one adapter as the CPU pass reads it: A [rank, in] and
/// B [out, rank] as slices, and the scale. Made from a [`LoraPair`]'s tensors by
/// [`add_deltas_cpu`], or from an adapter's packed table ([`super::packed`]).
#[derive(Clone, Copy)]
pub struct CpuPair<'a> {
    ab: Ab<'a>,
    rank: usize,
    scale: f32,
}

impl<'a> CpuPair<'a> {
    pub fn f16(a: &'a [f16], b: &'a [f16], rank: usize, scale: f32) -> Self {
        Self {
            ab: Ab::Dense(Dense::F16 { a, b }),
            rank,
            scale,
        }
    }

    /// An int8 pair: row k of A holds A[k, :] / `a_scales[k]`, column k of B holds
    /// B[:, k] / `b_scales[k]`; the rank is the number of scales.
    pub fn int8(
        a: &'a [i8],
        a_scales: &'a [f32],
        b: &'a [i8],
        b_scales: &'a [f32],
        scale: f32,
    ) -> Self {
        Self {
            ab: Ab::Int8(Int8Ab {
                a,
                a_scales,
                b,
                b_scales,
            }),
            rank: a_scales.len(),
            scale,
        }
    }

    /// Elements of A and of B.
    fn lens(&self) -> (usize, usize) {
        match self.ab {
            Ab::Dense(Dense::F32 { a, b }) => (a.len(), b.len()),
            Ab::Dense(Dense::F16 { a, b }) => (a.len(), b.len()),
            Ab::Int8(q) => (q.a.len(), q.b.len()),
        }
    }
}

/// [`add_deltas_cpu`] for pairs already in slices (see [`CpuPair`]).
pub fn add_pairs_cpu(ys: &Tensor, xs: &Tensor, groups: &[(CpuPair<'_>, &[u32])]) -> Result<bool> {
    add_pairs_cpu_with(ys, xs, groups, Kernel::detect(), true)
}

fn add_pairs_cpu_with(
    ys: &Tensor,
    xs: &Tensor,
    groups: &[(CpuPair<'_>, &[u32])],
    kernel: Kernel,
    parallel: bool,
) -> Result<bool> {
    if !ys.device().is_cpu() || ys.dtype() != DType::F32 || !ys.is_contiguous() {
        return Ok(false);
    }
    let (n, out_dim) = ys.dims2()?;
    let (nx, in_dim) = xs.dims2()?;
    if nx != n {
        candle_core::bail!("lora delta: {nx} input rows for {n} output rows");
    }
    if xs.dtype() != DType::F32 || !xs.is_contiguous() {
        return Ok(false);
    }
    let kernel = if kernel.is_available() {
        kernel
    } else {
        Kernel::Portable
    };
    // Which group last listed each row (group index + 1): one buffer for every group's
    // duplicate check, not one per group in this per-projection call.
    let mut seen_in = vec![0usize; n];
    let mut pairs = Vec::with_capacity(groups.len());
    for (g, (pair, rows)) in groups.iter().enumerate() {
        let rank = pair.rank;
        let (a_len, b_len) = pair.lens();
        if a_len != rank * in_dim || b_len != out_dim * rank {
            candle_core::bail!(
                "lora delta: A ({a_len} values) / B ({b_len}) of rank {rank} do not fit [{n}, {in_dim}] -> [{n}, {out_dim}]"
            );
        }
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= n) {
            candle_core::bail!("lora delta: row {r} of {n}");
        }
        // A block owns its rows' outputs, so one group cannot list a row twice.
        for &r in rows.iter() {
            if std::mem::replace(&mut seen_in[r as usize], g + 1) == g + 1 {
                candle_core::bail!("lora delta: row {r} listed twice for one adapter");
            }
        }
        pairs.push(Pair {
            ab: pair.ab,
            rank,
            scale: pair.scale,
            rows,
        });
    }
    let op = DeltaOp {
        pairs: &pairs,
        in_dim,
        out_dim,
        kernel,
        parallel,
    };
    ys.inplace_op2(xs, &op)?;
    Ok(true)
}

/// Rows of one group a task takes together, at most: B is read, widened and transposed once
/// for them all (a long prompt's rows).
const BLOCK_ROWS: usize = 16;

/// Rows the A pass takes together inside a block: A is read and widened once for them. Four
/// keeps the A pass's accumulators and the shared A vector well inside AVX2's registers.
const A_ROWS: usize = 4;

/// Blocks of at least this many rows take B's tiles transposed ([`Kernel::b_block_f16`]):
/// from four rows it measured faster on one thread (a 17-row prompt, blocks of four: 8.0 →
/// 5.2–6.1 ms, BENCHMARKS.md); fewer rows keep the per-row pass, whose horizontal sums cost
/// less than transposing for one.
const B_BLOCK_MIN_ROWS: usize = 4;

/// The block size for a group of `rows` rows: small groups keep small blocks so they still
/// split over two threads (four rows in one block would leave a thread idle: decode with 4
/// streams on one adapter lost 10%), and long prompts take the largest. A function of the row
/// count alone, so the threaded and the sequential pass add the same values in the same order.
fn block_rows(rows: usize) -> usize {
    match rows {
        0..4 => 1,
        4..8 => 2,
        8..32 => A_ROWS,
        _ => BLOCK_ROWS,
    }
}

/// Groups of at least this many rows take an int8 pair widened to f32 (once per call) and
/// the block kernels; smaller ones the integer row pass. `lora_speed`, one adapter, 2
/// threads: 17 rows 6.8–7.0 ms by rows against 9.1–16 ms widened; 128 rows ~26 ms widened.
const INT8_WIDEN_MIN_ROWS: usize = 32;

/// A and B of one pair as the pass reads them.
#[derive(Clone, Copy)]
enum Ab<'a> {
    Dense(Dense<'a>),
    Int8(Int8Ab<'a>),
}

/// A and B as floats, which the block kernels take.
#[derive(Clone, Copy)]
enum Dense<'a> {
    F32 { a: &'a [f32], b: &'a [f32] },
    F16 { a: &'a [f16], b: &'a [f16] },
}

struct Pair<'a> {
    ab: Ab<'a>,
    rank: usize,
    scale: f32,
    rows: &'a [u32],
}

struct DeltaOp<'a> {
    pairs: &'a [Pair<'a>],
    in_dim: usize,
    out_dim: usize,
    kernel: Kernel,
    parallel: bool,
}

impl InplaceOp2 for DeltaOp<'_> {
    fn name(&self) -> &'static str {
        "adapterd-lora-delta"
    }

    fn cpu_fwd(
        &self,
        ys: &mut CpuStorage,
        yl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(y), CpuStorage::F32(x)) = (ys, xs) else {
            candle_core::bail!("lora delta: activations must be f32");
        };
        let (Some((y0, y1)), Some((x0, x1))) = (yl.contiguous_offsets(), xl.contiguous_offsets())
        else {
            candle_core::bail!("lora delta: activations must be contiguous");
        };
        self.run(&mut y[y0..y1], &x[x0..x1]);
        Ok(())
    }
}

impl DeltaOp<'_> {
    fn run(&self, y: &mut [f32], x: &[f32]) {
        let (in_dim, out_dim) = (self.in_dim, self.out_dim);
        // An int8 pair on a long prompt's group is widened to f32 once for this call: the f32
        // block kernels then share A and B across rows, where the row pass rounds and sums
        // every row on its own (~2× slower at 128 rows; faster at 17, where widening the
        // whole adapter costs more than the rows).
        // Nothing is allocated unless one is (this runs per projection and decode step).
        let widen =
            |p: &Pair<'_>| matches!(p.ab, Ab::Int8(_)) && p.rows.len() >= INT8_WIDEN_MIN_ROWS;
        let widened: Vec<Option<(Vec<f32>, Vec<f32>)>>;
        let rebuilt: Vec<Pair<'_>>;
        let pairs: &[Pair<'_>] = if self.pairs.iter().any(widen) {
            widened = self
                .pairs
                .iter()
                .map(|p| match p.ab {
                    Ab::Int8(q) if widen(p) => Some(q.widen()),
                    _ => None,
                })
                .collect();
            rebuilt = self
                .pairs
                .iter()
                .zip(&widened)
                .map(|(p, w)| Pair {
                    ab: match w {
                        Some((a, b)) => Ab::Dense(Dense::F32 { a, b }),
                        None => p.ab,
                    },
                    ..*p
                })
                .collect();
            &rebuilt
        } else {
            self.pairs
        };
        let macs: usize = pairs
            .iter()
            .map(|p| p.rows.len() * p.rank * (in_dim + out_dim))
            .sum();
        let parallel =
            self.parallel && macs >= PARALLEL_MIN_MACS && rayon::current_num_threads() > 1;
        if parallel {
            // One item per (group, block of its rows), each owning its output rows, so tasks
            // need no locks. A row in two groups (which the forward never does) cannot be split
            // that way; the sequential pass below handles it.
            let mut slots: Vec<Option<&mut [f32]>> =
                y.chunks_exact_mut(out_dim).map(Some).collect();
            let mut items = Vec::new();
            let mut distinct = true;
            'pairs: for p in pairs {
                for rows in p.rows.chunks(block_rows(p.rows.len())) {
                    match Block::take(rows, &mut slots) {
                        Some(block) => items.push((p, block)),
                        None => {
                            distinct = false;
                            break 'pairs;
                        }
                    }
                }
            }
            if distinct {
                items
                    .into_par_iter()
                    .for_each(|(p, block)| self.block(p, x, block));
                return;
            }
        }
        // Group by group, so a row two groups share gets both deltas; the same blocks as the
        // threaded split, so the results are the same bits. (Rows within a group are distinct:
        // checked before the pass, so every block takes its rows.)
        for p in pairs {
            let mut slots: Vec<Option<&mut [f32]>> =
                y.chunks_exact_mut(out_dim).map(Some).collect();
            for rows in p.rows.chunks(block_rows(p.rows.len())) {
                if let Some(block) = Block::take(rows, &mut slots) {
                    self.block(p, x, block);
                }
            }
        }
    }

    /// ys[r] += B·(scale·A·x[r]) for the rows of one block.
    fn block(&self, p: &Pair<'_>, x: &[f32], mut block: Block<'_>) {
        let (in_dim, rows) = (self.in_dim, block.len);
        let ab = match p.ab {
            Ab::Dense(dense) => return self.dense_block(dense, p, x, block),
            Ab::Int8(ab) => ab,
        };
        // Decode rows and short prompts (long ones were widened in `run`): integer sums
        // straight from the int8 bytes, which is the point of int8 (half the bytes of f16).
        for (r, slot) in block.rows[..rows].iter().zip(block.ys.iter_mut()) {
            if let Some(y) = slot.take() {
                int8::delta_row(
                    self.kernel,
                    ab,
                    p.scale,
                    &x[r * in_dim..(r + 1) * in_dim],
                    y,
                );
            }
        }
    }

    /// [`Self::block`] for A and B as f32 or f16 (`ab`; `p` gives the rank and scale).
    fn dense_block(&self, ab: Dense<'_>, p: &Pair<'_>, x: &[f32], mut block: Block<'_>) {
        let (in_dim, rows, rank) = (self.in_dim, block.len, p.rank);
        // Sized for blocks of up to four rows (every decode item): zeroing it is paid per
        // item, so the rarer sixteen-row blocks of long prompts take the heap instead.
        let mut stack = [0f32; A_ROWS * 64];
        let mut heap = Vec::new();
        let t = if rows * rank <= stack.len() {
            &mut stack[..rows * rank]
        } else {
            heap.resize(rows * rank, 0f32);
            &mut heap[..]
        };
        let mut xs: [&[f32]; BLOCK_ROWS] = [&[]; BLOCK_ROWS];
        for (xr, r) in xs.iter_mut().zip(&block.rows[..rows]) {
            *xr = &x[r * in_dim..(r + 1) * in_dim];
        }
        let xs = &xs[..rows];
        let k = self.kernel;
        // rank ≥ 1 for every parsed adapter; max(1) keeps a rank-0 pair a no-op, not a panic.
        for (xs, t) in xs.chunks(A_ROWS).zip(t.chunks_mut(A_ROWS * rank.max(1))) {
            match ab {
                Dense::F32 { a, .. } => k.a_block_f32(a, in_dim, xs, p.scale, t),
                Dense::F16 { a, .. } => k.a_block_f16(a, in_dim, xs, p.scale, t),
            }
        }
        let mut ys: [&mut [f32]; BLOCK_ROWS] = Default::default();
        for (y, slot) in ys.iter_mut().zip(block.ys.iter_mut()) {
            *y = slot.take().unwrap_or_default();
        }
        let ys = &mut ys[..rows];
        if rows >= B_BLOCK_MIN_ROWS && k.b_block_fits(rank) {
            match ab {
                Dense::F32 { b, .. } => k.b_block_f32(b, t, ys),
                Dense::F16 { b, .. } => k.b_block_f16(b, t, ys),
            }
            return;
        }
        for (tr, y) in t.chunks_exact(rank.max(1)).zip(ys) {
            match ab {
                Dense::F32 { b, .. } => k.b_pass_f32(b, tr, y),
                Dense::F16 { b, .. } => k.b_pass_f16(b, tr, y),
            }
        }
    }
}

/// Up to [`BLOCK_ROWS`] rows of one group with their output rows: an item of the pass, kept
/// on the stack (the decode step with 8 adapters makes 1,680 of them).
struct Block<'y> {
    rows: [usize; BLOCK_ROWS],
    ys: [Option<&'y mut [f32]>; BLOCK_ROWS],
    len: usize,
}

impl<'y> Block<'y> {
    /// The block of `rows` (at most [`BLOCK_ROWS`]), taking each row's output out of `slots`;
    /// `None` when one is missing or already taken.
    fn take(rows: &[u32], slots: &mut [Option<&'y mut [f32]>]) -> Option<Self> {
        let mut block = Block {
            rows: [0; BLOCK_ROWS],
            ys: Default::default(),
            len: 0,
        };
        for (i, &r) in rows.iter().enumerate().take(BLOCK_ROWS) {
            block.ys[i] = Some(slots.get_mut(r as usize)?.take()?);
            block.rows[i] = r as usize;
            block.len = i + 1;
        }
        Some(block)
    }
}

impl Kernel {
    fn dot_f32(self, a: &[f32], x: &[f32]) -> f32 {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` reaches here only when the CPU has it (checked in
            // `add_deltas_cpu_with`).
            Kernel::Avx2 => unsafe { x86::dot_f32(a, x) },
            _ => dot(a, x),
        }
    }

    fn dot_f16(self, a: &[f16], x: &[f32]) -> f32 {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_f32`.
            Kernel::Avx2 => unsafe { x86::dot_f16(a, x) },
            _ => {
                let mut acc = [0f32; 8];
                let (ac, ar) = a.split_at(a.len() / 8 * 8);
                let (xc, xr) = x.split_at(ac.len().min(x.len()));
                for (ca, cx) in ac.chunks_exact(8).zip(xc.chunks_exact(8)) {
                    for i in 0..8 {
                        acc[i] += widen(ca[i]) * cx[i];
                    }
                }
                let tail: f32 = ar.iter().zip(xr).map(|(p, q)| widen(*p) * q).sum();
                acc.iter().sum::<f32>() + tail
            }
        }
    }

    /// t[r·rank + k] = scale·A[k, :]·xs[r] for every row r of the block, A [rank, in] read
    /// once for all of them (one row: the two-chain dot).
    fn a_block_f32(self, a: &[f32], in_dim: usize, xs: &[&[f32]], scale: f32, t: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx2 && xs.len() > 1 {
            // SAFETY: as in `dot_f32`.
            unsafe { x86::a_block_f32(a, in_dim, xs, scale, t) };
            return;
        }
        row_by_row(a, in_dim, xs, scale, t, |aj, x| self.dot_f32(aj, x));
    }

    fn a_block_f16(self, a: &[f16], in_dim: usize, xs: &[&[f32]], scale: f32, t: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx2 && xs.len() > 1 {
            // SAFETY: as in `dot_f32`.
            unsafe { x86::a_block_f16(a, in_dim, xs, scale, t) };
            return;
        }
        row_by_row(a, in_dim, xs, scale, t, |aj, x| self.dot_f16(aj, x));
    }

    /// Whether [`Kernel::b_block_f16`] takes adapters of `rank`: AVX2, whole 8-wide steps of
    /// the rank, and a transposed tile (rank × 8 values) that stays in L1.
    fn b_block_fits(self, rank: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self == Kernel::Avx2
            && rank.is_multiple_of(8)
            && (8..=x86::MAX_TILE_RANK).contains(&rank);
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = rank;
            false
        }
    }

    /// ys[r][o] += B[o, :]·t[r·rank..] for every row r of a block, B [out, rank] read once for
    /// all of them: eight outputs' B values are widened and transposed, then each row takes
    /// them with broadcasts of its t (no horizontal sums). Only where `b_block_fits`.
    fn b_block_f32(self, b: &[f32], t: &[f32], ys: &mut [&mut [f32]]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Avx2` reaches here only when the CPU has it (checked in
        // `add_deltas_cpu_with`), and only with a rank `b_block_fits`.
        unsafe {
            x86::b_block_f32(b, t, ys)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (b, t, ys);
    }

    fn b_block_f16(self, b: &[f16], t: &[f32], ys: &mut [&mut [f32]]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `b_block_f32`.
        unsafe {
            x86::b_block_f16(b, t, ys)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (b, t, ys);
    }

    /// y[o] += B[o, :]·t for B [y.len(), t.len()].
    fn b_pass_f32(self, b: &[f32], t: &[f32], y: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_f32`.
            Kernel::Avx2 => unsafe { x86::b_pass_f32(b, t, y) },
            _ => {
                for (yo, bo) in y.iter_mut().zip(b.chunks_exact(t.len())) {
                    *yo += dot(bo, t);
                }
            }
        }
    }

    fn b_pass_f16(self, b: &[f16], t: &[f32], y: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_f32`.
            Kernel::Avx2 => unsafe { x86::b_pass_f16(b, t, y) },
            _ => {
                for (yo, bo) in y.iter_mut().zip(b.chunks_exact(t.len())) {
                    *yo += Kernel::Portable.dot_f16(bo, t);
                }
            }
        }
    }
}

/// The A pass one input row at a time: t[r·rank + k] = scale·dot(A[k, :], xs[r]).
fn row_by_row<T>(
    a: &[T],
    in_dim: usize,
    xs: &[&[f32]],
    scale: f32,
    t: &mut [f32],
    dot: impl Fn(&[T], &[f32]) -> f32,
) {
    let rank = t.len() / xs.len().max(1);
    for (x, tr) in xs.iter().zip(t.chunks_exact_mut(rank.max(1))) {
        for (tj, aj) in tr.iter_mut().zip(a.chunks_exact(in_dim.max(1))) {
            *tj = dot(aj, x) * scale;
        }
    }
}

/// f16 to f32 in plain integer and float operations the compiler vectorises (the `half`
/// crate's per-value conversion branches, and its slice conversion costs a call per chunk):
/// the magnitude bits moved into f32's place and rescaled by 2^112, which also makes f16
/// subnormals exact. Infinities and NaNs never reach here: the parser refuses them.
#[inline(always)]
pub(crate) fn widen(h: f16) -> f32 {
    let h = u32::from(h.to_bits());
    let magnitude = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits(0x7780_0000);
    f32::from_bits(magnitude.to_bits() | ((h & 0x8000) << 16))
}

/// A dot product in eight independent lanes, so the compiler can vectorise it without
/// reassociating a single running sum.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len().min(b.len()));
    for (ca, cb) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(p, q)| p * q).sum();
    acc.iter().sum::<f32>() + tail
}

/// AVX2 + FMA + F16C loops. Every function bounds its reads by the slices it is given, so a
/// length mismatch gives a short sum, never an out-of-bounds read.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// Eight f16 at `p` widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// The eight horizontal sums of `acc` as one vector, in order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn reduce8(acc: &[__m256; 8]) -> __m256 {
        let h01 = _mm256_hadd_ps(acc[0], acc[1]);
        let h23 = _mm256_hadd_ps(acc[2], acc[3]);
        let h45 = _mm256_hadd_ps(acc[4], acc[5]);
        let h67 = _mm256_hadd_ps(acc[6], acc[7]);
        let lo = _mm256_hadd_ps(h01, h23);
        let hi = _mm256_hadd_ps(h45, h67);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(lo, hi),
            _mm256_permute2f128_ps::<0x31>(lo, hi),
        )
    }

    macro_rules! kernels {
        ($dot:ident, $b_pass:ident, $t:ty, $load:ident) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $dot(a: &[$t], x: &[f32]) -> f32 {
                let n = a.len().min(x.len());
                let (pa, px) = (a.as_ptr(), x.as_ptr());
                let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut i = 0;
                while i + 16 <= n {
                    s0 = _mm256_fmadd_ps($load(pa.add(i)), _mm256_loadu_ps(px.add(i)), s0);
                    s1 = _mm256_fmadd_ps($load(pa.add(i + 8)), _mm256_loadu_ps(px.add(i + 8)), s1);
                    i += 16;
                }
                if i + 8 <= n {
                    s0 = _mm256_fmadd_ps($load(pa.add(i)), _mm256_loadu_ps(px.add(i)), s0);
                    i += 8;
                }
                let mut s = hsum(_mm256_add_ps(s0, s1));
                for j in i..n {
                    s += f32::from(a[j]) * x[j];
                }
                s
            }

            /// y[o] += B[o, :]·t; eight outputs at a time when the rank is a multiple of 8
            /// (8, 16, 32, 64: what adapters use), so B is read in order.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $b_pass(b: &[$t], t: &[f32], y: &mut [f32]) {
                let rank = t.len();
                if rank == 0 {
                    return;
                }
                let out = y.len().min(b.len() / rank);
                let mut o = 0;
                if rank % 8 == 0 {
                    let (pb, pt, py) = (b.as_ptr(), t.as_ptr(), y.as_mut_ptr());
                    while o + 8 <= out {
                        let mut acc = [_mm256_setzero_ps(); 8];
                        let mut k = 0;
                        while k < rank {
                            let tv = _mm256_loadu_ps(pt.add(k));
                            for (i, a) in acc.iter_mut().enumerate() {
                                *a = _mm256_fmadd_ps($load(pb.add((o + i) * rank + k)), tv, *a);
                            }
                            k += 8;
                        }
                        let sums = reduce8(&acc);
                        let yp = py.add(o);
                        _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(yp), sums));
                        o += 8;
                    }
                }
                for oo in o..out {
                    y[oo] += $dot(&b[oo * rank..(oo + 1) * rank], t);
                }
            }
        };
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    kernels!(dot_f32, b_pass_f32, f32, load_f32);
    kernels!(dot_f16, b_pass_f16, f16, load_f16);

    /// The largest rank [`b_block_f32`] takes: its transposed tile is rank × 8 f32 on the stack.
    pub const MAX_TILE_RANK: usize = 64;

    /// `r[i]` becomes column i: out[j][i] = r[i][j] (an 8×8 transpose in registers).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        // Lane halves: s0 holds column 0 (low) and 4 (high) of rows 0-3, s1 columns 1/5, …
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// ys[row + r][o..o + 8] += Σ_k t[(row + r)·rank + k]·tile[k] for rows row..row + R (which
    /// `ys` must have). Two chains over k for each row, and the rows interleaved, so four rows
    /// make eight FMA chains, which hide the FMAs' latency.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_rows<const R: usize>(
        tile: &[__m256; MAX_TILE_RANK],
        rank: usize,
        pt: *const f32,
        ys: &mut [&mut [f32]],
        row: usize,
        o: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut k = 0;
        while k < rank {
            let (c0, c1) = (tile[k], tile[k + 1]);
            for (r, a) in acc.iter_mut().enumerate() {
                let tp = pt.add((row + r) * rank + k);
                a[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*tp), c0, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*tp.add(1)), c1, a[1]);
            }
            k += 2;
        }
        for (a, y) in acc.iter().zip(ys[row..row + R].iter_mut()) {
            let yp = y.as_mut_ptr().add(o);
            _mm256_storeu_ps(
                yp,
                _mm256_add_ps(_mm256_loadu_ps(yp), _mm256_add_ps(a[0], a[1])),
            );
        }
    }

    macro_rules! b_block {
        ($name:ident, $t:ty, $load:ident, $dot:ident) => {
            /// ys[r][o] += B[o, :]·t[r·rank..(r+1)·rank] for every row r, rank = t.len() /
            /// ys.len(), a multiple of 8 up to [`MAX_TILE_RANK`] (else nothing is done).
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(b: &[$t], t: &[f32], ys: &mut [&mut [f32]]) {
                let rows = ys.len();
                let rank = if rows == 0 { 0 } else { t.len() / rows };
                if rank == 0 || rank % 8 != 0 || rank > MAX_TILE_RANK {
                    return;
                }
                let out = ys
                    .iter()
                    .map(|y| y.len())
                    .min()
                    .unwrap_or(0)
                    .min(b.len() / rank);
                let (pb, pt) = (b.as_ptr(), t.as_ptr());
                // Column k of the current eight outputs: tile[k][i] = B[o + i, k].
                let mut tile = [_mm256_setzero_ps(); MAX_TILE_RANK];
                let mut o = 0;
                while o + 8 <= out {
                    let mut k = 0;
                    while k < rank {
                        let mut r = [_mm256_setzero_ps(); 8];
                        for (i, v) in r.iter_mut().enumerate() {
                            *v = $load(pb.add((o + i) * rank + k));
                        }
                        let c = transpose8(r);
                        tile[k..k + 8].copy_from_slice(&c);
                        k += 8;
                    }
                    let mut row = 0;
                    while row + 4 <= rows {
                        tile_rows::<4>(&tile, rank, pt, ys, row, o);
                        row += 4;
                    }
                    while row < rows {
                        tile_rows::<1>(&tile, rank, pt, ys, row, o);
                        row += 1;
                    }
                    o += 8;
                }
                for (row, y) in ys.iter_mut().enumerate() {
                    let tr = &t[row * rank..(row + 1) * rank];
                    for oo in o..out {
                        y[oo] += $dot(&b[oo * rank..(oo + 1) * rank], tr);
                    }
                }
            }
        };
    }

    b_block!(b_block_f32, f32, load_f32, dot_f32);
    b_block!(b_block_f16, f16, load_f16, dot_f16);

    macro_rules! a_block {
        ($name:ident, $fixed:ident, $t:ty, $load:ident) => {
            /// A [rank, in] against 2..=4 input rows at once: each A vector is loaded (and
            /// widened) once and multiplied into every row's accumulator.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(a: &[$t], in_dim: usize, xs: &[&[f32]], scale: f32, t: &mut [f32]) {
                match xs.len() {
                    2 => $fixed::<2>(a, in_dim, xs, scale, t),
                    3 => $fixed::<3>(a, in_dim, xs, scale, t),
                    4 => $fixed::<4>(a, in_dim, xs, scale, t),
                    _ => {}
                }
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $fixed<const R: usize>(
                a: &[$t],
                in_dim: usize,
                xs: &[&[f32]],
                scale: f32,
                t: &mut [f32],
            ) {
                if in_dim == 0 || xs.len() != R || xs.iter().any(|x| x.len() < in_dim) {
                    return;
                }
                let rank = (t.len() / R).min(a.len() / in_dim);
                let full = in_dim / 8 * 8;
                let mut xp = [std::ptr::null::<f32>(); R];
                for r in 0..R {
                    xp[r] = xs[r].as_ptr();
                }
                for k in 0..rank {
                    let row = a.as_ptr().add(k * in_dim);
                    let mut acc = [_mm256_setzero_ps(); R];
                    let mut i = 0;
                    while i < full {
                        let av = $load(row.add(i));
                        for r in 0..R {
                            acc[r] = _mm256_fmadd_ps(av, _mm256_loadu_ps(xp[r].add(i)), acc[r]);
                        }
                        i += 8;
                    }
                    for r in 0..R {
                        let mut s = hsum(acc[r]);
                        for j in full..in_dim {
                            s += f32::from(a[k * in_dim + j]) * xs[r][j];
                        }
                        t[r * rank + k] = s * scale;
                    }
                }
            }
        };
    }

    a_block!(a_block_f32, a_block_f32_rows, f32, load_f32);
    a_block!(a_block_f16, a_block_f16_rows, f16, load_f16);
}

#[cfg(test)]
mod tests;
