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
    };
    assert!(add_deltas_cpu(&ys, &xs, &[(&p, &[0])]).is_err());
    let p = LoraPair {
        a: zeros(2, 8),
        b: zeros(6, 2),
        scale: 1.0,
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
    };
    assert!(!add_deltas_cpu(&ys, &xs, &[(&p, &[0])]).expect("no error"));
}
