//! The fused pass against the composed candle ops it replaces, for both kernels, both
//! element types, and the threaded and sequential splits.

use super::*;
use candle_core::Device;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn tensor(v: Vec<f32>, shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

fn pair(rank: usize, d_in: usize, d_out: usize, seed: u32, dtype: DType) -> LoraPair {
    let a = tensor(values(rank * d_in, seed), (rank, d_in));
    let b = tensor(values(d_out * rank, seed + 1), (d_out, rank));
    LoraPair {
        a: a.to_dtype(dtype).expect("a"),
        b: b.to_dtype(dtype).expect("b"),
        scale: 0.75,
        int8: None,
    }
}

/// ys plus each group's delta through index_select / matmul / index_add, in f32.
fn composed(ys: &Tensor, xs: &Tensor, groups: &[(&LoraPair, &[u32])]) -> Vec<Vec<f32>> {
    let mut want = ys.copy().expect("copy");
    for (p, rows) in groups {
        let idx = Tensor::from_vec(rows.to_vec(), rows.len(), &Device::Cpu).expect("idx");
        let a = p.a.to_dtype(DType::F32).expect("a");
        let b = p.b.to_dtype(DType::F32).expect("b");
        let x = xs.index_select(&idx, 0).expect("select");
        let xab = x
            .matmul(&a.t().expect("at"))
            .and_then(|xa| xa.matmul(&b.t()?))
            .expect("xab");
        let delta = (xab * p.scale).expect("delta");
        want = want.index_add(&idx, &delta, 0).expect("index_add");
    }
    want.to_vec2::<f32>().expect("2-d")
}

fn fused(
    ys: &Tensor,
    xs: &Tensor,
    groups: &[(&LoraPair, &[u32])],
    kernel: Kernel,
    parallel: bool,
) -> Vec<Vec<f32>> {
    let out = ys.copy().expect("a fresh output");
    assert!(add_deltas_cpu_with(&out, xs, groups, kernel, parallel).expect("fits"));
    out.to_vec2::<f32>().expect("2-d")
}

fn kernels() -> Vec<Kernel> {
    [Kernel::Avx2, Kernel::Portable]
        .into_iter()
        .filter(|k| k.is_available())
        .collect()
}

/// The fused pass with every kernel, threaded and not, against the composed ops: within
/// `tol`·max(|want|, 1) everywhere. Returns each result.
fn every_split_matches(
    ys: &Tensor,
    xs: &Tensor,
    groups: &[(&LoraPair, &[u32])],
    tol: f32,
    what: &str,
) -> Vec<Vec<Vec<f32>>> {
    let want = composed(ys, xs, groups);
    let mut all = Vec::new();
    for k in kernels() {
        for parallel in [false, true] {
            let got = fused(ys, xs, groups, k, parallel);
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!(
                    (g - w).abs() <= tol * w.abs().max(1.0),
                    "{k:?} parallel {parallel} {what}: {g} vs {w}"
                );
            }
            all.push(got);
        }
    }
    all
}

#[test]
fn matches_the_composed_tensor_ops_on_the_listed_rows_only() {
    // Ranks and widths off the vector sizes as well as on them (8-wide blocks plus tails).
    for (d_in, d_out, rank) in [(37, 23, 4), (64, 40, 16), (19, 9, 8)] {
        let n = 5;
        let xs = tensor(values(n * d_in, 1), (n, d_in));
        let ys = tensor(values(n * d_out, 2), (n, d_out));
        let (p1, p2) = (
            pair(rank, d_in, d_out, 3, DType::F32),
            pair(rank, d_in, d_out, 5, DType::F32),
        );
        let groups: [(&LoraPair, &[u32]); 2] = [(&p1, &[0, 3]), (&p2, &[1, 4])];
        for got in every_split_matches(&ys, &xs, &groups, 1e-4, &format!("{d_in}x{d_out} r{rank}"))
        {
            // Row 2 belongs to no group: untouched.
            assert_eq!(got[2], ys.to_vec2::<f32>().expect("ys")[2]);
        }
    }
}

#[test]
fn blocks_of_rows_match_the_composed_ops() {
    // Groups of 1, 5, 11 and 37 rows: blocks of one, two (2+2+1), four (4+4+3, B transposed in
    // the blocks of four) and sixteen (16+16+5, the A pass four rows at a time inside); widths
    // on and off the 8-wide steps, ranks that take the transposed B and ones that do not.
    for (d_in, d_out, rank) in [(64, 40, 16), (37, 23, 4), (576, 192, 16), (19, 9, 8)] {
        let n = 54;
        let xs = tensor(values(n * d_in, 1), (n, d_in));
        let ys = tensor(values(n * d_out, 2), (n, d_out));
        let prompt: Vec<u32> = (17..54).rev().collect();
        let rows: [&[u32]; 4] = [
            &[3],
            &[0, 2, 4, 6, 8],
            &[1, 5, 7, 9, 10, 11, 12, 13, 14, 15, 16],
            &prompt,
        ];
        for dtype in [DType::F32, DType::F16] {
            let ps: Vec<LoraPair> = (0..4)
                .map(|i| pair(rank, d_in, d_out, 20 + i, dtype))
                .collect();
            let groups: Vec<(&LoraPair, &[u32])> = ps.iter().zip(rows).collect();
            let what = format!("{dtype:?} [{d_in}->{d_out} r{rank}]");
            every_split_matches(&ys, &xs, &groups, 2e-3, &what);
        }
    }
}

#[test]
fn f16_weights_stay_within_half_precision_of_the_f32_composition() {
    // q_proj-like shape; the reference multiplies the original f32 weights, so this bounds
    // what storing A/B as f16 costs, not just the kernel.
    let (n, d_in, d_out, rank) = (3, 576, 576, 16);
    let xs = tensor(values(n * d_in, 7), (n, d_in));
    let ys = tensor(vec![0.0; n * d_out], (n, d_out));
    let wide = pair(rank, d_in, d_out, 11, DType::F32);
    let half = pair(rank, d_in, d_out, 11, DType::F16);
    let rows = [0u32, 1, 2];
    let want = composed(&ys, &xs, &[(&wide, &rows)]);
    let peak = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    for k in kernels() {
        let got = fused(&ys, &xs, &[(&half, &rows)], k, true);
        let worst = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        // f16 keeps 11 significant bits (relative step 2^-11 ≈ 4.9e-4) on both A and B.
        assert!(
            worst <= 2e-3 * peak,
            "{k:?}: worst error {worst}, peak delta {peak}"
        );
    }
}

#[test]
fn the_threaded_split_gives_the_same_bits_as_one_thread() {
    // Eight adapters, one row each (a decode step at gate_proj's shape), and a prompt-like
    // group of 37 rows (blocks of sixteen, sixteen and five).
    let (streams, prompt, d_in, d_out, rank) = (8, 37, 576, 1536, 16);
    let n = streams + prompt;
    let xs = tensor(values(n * d_in, 1), (n, d_in));
    let ys = tensor(values(n * d_out, 2), (n, d_out));
    let mut pairs: Vec<LoraPair> = (0..streams as u32)
        .map(|i| pair(rank, d_in, d_out, 10 + 2 * i, DType::F16))
        .collect();
    pairs.push(pair(rank, d_in, d_out, 40, DType::F16));
    let mut rows: Vec<Vec<u32>> = (0..streams as u32).map(|i| vec![i]).collect();
    rows.push((streams as u32..n as u32).collect());
    let groups: Vec<(&LoraPair, &[u32])> = pairs
        .iter()
        .zip(&rows)
        .map(|(p, r)| (p, r.as_slice()))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    for k in kernels() {
        let one = fused(&ys, &xs, &groups, k, false);
        let two = pool.install(|| fused(&ys, &xs, &groups, k, true));
        assert_eq!(one, two, "{k:?}");
    }
}

#[test]
fn two_groups_on_one_row_both_apply() {
    let (n, d_in, d_out, rank) = (4, 576, 1536, 16);
    let xs = tensor(values(n * d_in, 1), (n, d_in));
    let ys = tensor(values(n * d_out, 2), (n, d_out));
    let (p1, p2) = (
        pair(rank, d_in, d_out, 3, DType::F32),
        pair(rank, d_in, d_out, 5, DType::F32),
    );
    let groups: [(&LoraPair, &[u32]); 2] = [(&p1, &[0, 1, 2, 3]), (&p2, &[1])];
    let want = composed(&ys, &xs, &groups);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let got = pool.install(|| fused(&ys, &xs, &groups, Kernel::detect(), true));
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!((g - w).abs() < 1e-3, "{g} vs {w}");
    }
}

#[test]
fn widening_f16_is_exact_for_every_finite_value() {
    for bits in 0..=u16::MAX {
        let h = f16::from_bits(bits);
        if h.is_finite() {
            assert_eq!(widen(h).to_bits(), h.to_f32().to_bits(), "{bits:#06x}");
        }
    }
}

#[test]
fn shapes_that_do_not_fit_are_an_error_not_a_panic() {
    let dev = Device::Cpu;
    let zeros = |r, c| Tensor::zeros((r, c), DType::F32, &dev).expect("zeros");
    let (xs, ys) = (zeros(2, 8), zeros(2, 6));
    let p = LoraPair {
        a: zeros(2, 7),
        b: zeros(6, 2),
        scale: 1.0,
        int8: None,
    };
    assert!(add_deltas_cpu(&ys, &xs, &[(&p, &[0])]).is_err());
    let p = LoraPair {
        a: zeros(2, 8),
        b: zeros(6, 2),
        scale: 1.0,
        int8: None,
    };
    assert!(add_deltas_cpu(&ys, &xs, &[(&p, &[5])]).is_err());
    assert!(add_deltas_cpu(&ys, &xs, &[(&p, &[1, 0, 1])]).is_err());
    // One row in two groups is not a duplicate: each group adds its own delta.
    assert!(add_deltas_cpu(&ys, &xs, &[(&p, &[0, 1]), (&p, &[1])]).is_ok());
}

#[test]
fn weights_of_mixed_dtypes_are_left_to_the_tensor_path() {
    let dev = Device::Cpu;
    let xs = Tensor::zeros((1, 8), DType::F32, &dev).expect("xs");
    let ys = Tensor::zeros((1, 6), DType::F32, &dev).expect("ys");
    let p = LoraPair {
        a: Tensor::zeros((2, 8), DType::F16, &dev).expect("a"),
        b: Tensor::zeros((6, 2), DType::F32, &dev).expect("b"),
        scale: 1.0,
        int8: None,
    };
    assert!(!add_deltas_cpu(&ys, &xs, &[(&p, &[0])]).expect("no error"));
}

fn int8_pair(rank: usize, d_in: usize, d_out: usize, seed: u32) -> (LoraPair, LoraPair) {
    let wide = pair(rank, d_in, d_out, seed, DType::F32);
    let q = crate::engine::lora::int8::quantize_pair(&wide).expect("quantize");
    (wide, q)
}

/// Every kernel and split of an int8 pass: threaded and sequential give the same bits, and
/// the kernels the same bits on decode-sized groups (integer sums) and agree to float
/// rounding on prompt-sized ones (widened to f32 blocks). Returns the portable result.
fn int8_everywhere(ys: &Tensor, xs: &Tensor, groups: &[(&LoraPair, &[u32])]) -> Vec<Vec<f32>> {
    let same_bits = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .all(|(g, w)| g.to_bits() == w.to_bits())
    };
    let first = fused(ys, xs, groups, Kernel::Portable, false);
    let decode_only = groups.iter().all(|(_, rows)| rows.len() < 4);
    let peak = first.iter().flatten().fold(1f32, |m, v| m.max(v.abs()));
    for k in kernels() {
        let one = fused(ys, xs, groups, k, false);
        let threaded = fused(ys, xs, groups, k, true);
        assert!(same_bits(&one, &threaded), "{k:?}: threaded differs");
        if decode_only {
            assert!(
                same_bits(&one, &first),
                "{k:?} differs from the portable pass"
            );
        } else {
            for (g, w) in one.iter().flatten().zip(first.iter().flatten()) {
                assert!((g - w).abs() <= 1e-5 * peak, "{k:?}: {g} vs {w}");
            }
        }
    }
    first
}

#[test]
fn int8_pairs_stay_within_their_rounding_of_the_f32_composition() {
    // Shapes on and off the 16-wide steps, ranks on the AVX2 path (8, 16, 24, 64) and off it
    // (5), decode rows and a prompt-sized group; one row no group lists.
    for (d_in, d_out, rank) in [
        (576, 192, 16),
        (1536, 576, 16),
        (37, 23, 5),
        (64, 41, 8),
        (100, 70, 24),
        (96, 40, 64),
    ] {
        let n = 40;
        let xs = tensor(values(n * d_in, 1), (n, d_in));
        let ys = tensor(values(n * d_out, 2), (n, d_out));
        let (w1, q1) = int8_pair(rank, d_in, d_out, 3);
        let (w2, q2) = int8_pair(rank, d_in, d_out, 9);
        let prompt: Vec<u32> = (3..40).collect();
        let rows: [&[u32]; 2] = [&[0, 2], &prompt];
        let want = composed(&ys, &xs, &[(&w1, rows[0]), (&w2, rows[1])]);
        let got = int8_everywhere(&ys, &xs, &[(&q1, rows[0]), (&q2, rows[1])]);
        let base = ys.to_vec2::<f32>().expect("ys");
        assert_eq!(got[1], base[1], "row 1 is in no group");
        let peak = want
            .iter()
            .flatten()
            .zip(base.iter().flatten())
            .fold(0f32, |m, (w, b)| m.max((w - b).abs()));
        let worst = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        // Half an int8 step (1/254 of a row's or column's peak) on A and on B, plus the int16
        // roundings: ~1% of the largest delta at worst for these uniform values.
        assert!(
            worst <= 1.5e-2 * peak && peak > 0.0,
            "[{d_in}->{d_out} r{rank}]: worst {worst}, peak delta {peak}"
        );
    }
}

#[test]
fn int8_sums_are_exact_at_the_extremes() {
    // Every A value at +127 steps and every input at its peak: the integer sums reach their
    // bounds (an A row longer than one i32 chunk, B at rank 64) and must not wrap.
    let (d_in, d_out, rank) = (5000, 16, 64);
    let wide = LoraPair {
        a: tensor(vec![1.0; rank * d_in], (rank, d_in)),
        b: tensor(vec![-1.0; d_out * rank], (d_out, rank)),
        scale: 1.0,
        int8: None,
    };
    let q = crate::engine::lora::int8::quantize_pair(&wide).expect("quantize");
    let xs = tensor(vec![2.0; d_in], (1, d_in));
    let ys = tensor(vec![0.0; d_out], (1, d_out));
    let got = int8_everywhere(&ys, &xs, &[(&q, &[0])]);
    let want = -(d_in as f32) * 2.0 * rank as f32;
    for g in &got[0] {
        assert!((g - want).abs() <= 1e-4 * want.abs(), "{g} vs {want}");
    }
}

#[test]
fn int8_leaves_zero_inputs_and_zero_weights_alone() {
    let (d_in, d_out, rank) = (64, 16, 8);
    let (_, q) = int8_pair(rank, d_in, d_out, 4);
    let zero = crate::engine::lora::int8::quantize_pair(&LoraPair {
        a: tensor(vec![0.0; rank * d_in], (rank, d_in)),
        b: tensor(vec![0.0; d_out * rank], (d_out, rank)),
        scale: 1.0,
        int8: None,
    })
    .expect("quantize");
    let mut x = values(2 * d_in, 5);
    x[..d_in].fill(0.0);
    let xs = tensor(x, (2, d_in));
    let ys = tensor(values(2 * d_out, 6), (2, d_out));
    let got = int8_everywhere(&ys, &xs, &[(&q, &[0]), (&zero, &[1])]);
    assert_eq!(got, ys.to_vec2::<f32>().expect("ys"));
}

#[test]
fn int8_dense_form_is_the_rounded_weights() {
    let (wide, q) = int8_pair(16, 96, 40, 12);
    assert_eq!(q.a.dtype(), DType::U8);
    let (a, b) = q.dense_f32().expect("dense");
    for (got, want) in [(a, &wide.a), (b, &wide.b)] {
        let got = got
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("got");
        let want = want
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("want");
        let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= peak / 254.0 * 1.0001, "{g} vs {w}");
        }
    }
    // The tensor path (what `kernels = "portable"` runs) gives the kernel's result within the
    // int16 roundings.
    let n = 3;
    let xs = tensor(values(n * 96, 1), (n, 96));
    let ys = tensor(vec![0.0; n * 40], (n, 40));
    let (a, b) = q.dense_f32().expect("dense");
    let dense = LoraPair {
        a,
        b,
        scale: q.scale,
        int8: None,
    };
    let want = composed(&ys, &xs, &[(&dense, &[0, 1, 2])]);
    let got = int8_everywhere(&ys, &xs, &[(&q, &[0, 1, 2])]);
    let peak = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!((g - w).abs() <= 1e-3 * peak, "{g} vs {w}");
    }
    // Half the bytes of f16, plus two scales per rank index.
    assert_eq!(q.size_bytes(), (16 * 96 + 40 * 16) + 2 * 16 * 4);
}

#[test]
fn int8_scales_that_do_not_fit_the_rank_are_an_error() {
    let (_, mut q) = int8_pair(8, 32, 16, 2);
    if let Some(s) = &mut q.int8 {
        s.b = vec![1.0; 7].into();
    }
    let xs = tensor(values(32, 1), (1, 32));
    let ys = tensor(vec![0.0; 16], (1, 16));
    assert!(add_deltas_cpu(&ys, &xs, &[(&q, &[0])]).is_err());
}
