//! Every instruction-set path against the scalar reference, for every format, at row counts
//! that exercise each tile size and block counts that leave remainders.

use super::*;
use candle_core::Device;

const FORMATS: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];
const ROW_COUNTS: [usize; 8] = [1, 2, 3, 4, 5, 8, 9, 17];

/// Deterministic values in about [-1, 1] (a 64-bit LCG; no RNG crate needed).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn weight(rows: usize, cols: usize, dtype: GgmlDType, seed: u64) -> (QWeight, Tensor) {
    let w = Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let deq = q.dequantize(&Device::Cpu).unwrap();
    (QWeight::from_qtensor(&q).unwrap().unwrap(), deq)
}

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
        .into_iter()
        .filter(|i| i.is_available())
        .collect()
}

fn run(k: &QWeight, x: &[f32], n: usize, p: ActivationPrecision, isa: Isa) -> Vec<f32> {
    let mut out = vec![0f32; n * k.rows()];
    k.matmul_with(x, n, &mut out, p, isa);
    out
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what} [{i}]: {g} vs {w}"
        );
    }
}

/// The f32 path equals x·Wᵀ computed on candle's own dequantization of the same blocks (so
/// only summation order differs), on every instruction set. An odd weight-row count leaves
/// the AVX-512 kernel, which takes weight rows in pairs, a single row at the end.
#[test]
fn f32_path_matches_dequantized_matmul_on_every_isa() {
    let (rows, cols) = (41, 96);
    for dtype in FORMATS {
        let (k, deq) = weight(rows, cols, dtype, 1);
        for n in ROW_COUNTS {
            let x = values(n * cols, 2 + n as u64);
            let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
            let want: Vec<f32> = xt
                .matmul(&deq.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for isa in isas() {
                let got = run(&k, &x, n, ActivationPrecision::F32, isa);
                assert_close(&got, &want, 1e-4, &format!("{dtype:?} n={n} {isa:?}"));
            }
        }
    }
}

/// The int8 and int16 SIMD paths compute the same integer dot products as the scalar reference; only
/// float summation order differs. 67 blocks per row crosses the 64-block offset buffer, and
/// 3 blocks leaves a remainder for every accumulator count.
#[test]
fn integer_paths_match_the_scalar_reference_for_every_format_and_row_count() {
    for (rows, cols) in [(37, 96), (5, 67 * QK)] {
        for dtype in FORMATS {
            let (k, _) = weight(rows, cols, dtype, 3);
            for n in ROW_COUNTS {
                let x = values(n * cols, 4 + n as u64);
                for p in [ActivationPrecision::Int8, ActivationPrecision::Int16] {
                    let want = run(&k, &x, n, p, Isa::Scalar);
                    for isa in isas() {
                        let got = run(&k, &x, n, p, isa);
                        let what = format!("{dtype:?} {p:?} {rows}x{cols} n={n} {isa:?}");
                        assert_close(&got, &want, 1e-4, &what);
                    }
                }
            }
        }
    }
}

/// Quantizing activations to int8 or int16 moves each output by much less than the scale of the
/// values it sums: the error is bounded by Σ|w|·(dx/2) per block.
#[test]
fn integer_paths_stay_within_the_rounding_bound_of_the_exact_path() {
    let (rows, cols) = (24, 8 * QK);
    for dtype in FORMATS {
        let (k, deq) = weight(rows, cols, dtype, 5);
        let deq: Vec<f32> = deq.flatten_all().unwrap().to_vec1().unwrap();
        for (n, p) in [
            (1usize, ActivationPrecision::Int8),
            (5, ActivationPrecision::Int8),
            (1, ActivationPrecision::Int16),
            (5, ActivationPrecision::Int16),
        ] {
            let x = values(n * cols, 6);
            let exact = run(&k, &x, n, ActivationPrecision::F32, Isa::Scalar);
            let mut acts = QuantRows::default();
            acts.quantize(&x, cols, Isa::Scalar, p == ActivationPrecision::Int16);
            for isa in isas() {
                let got = run(&k, &x, n, p, isa);
                for r in 0..n {
                    for j in 0..rows {
                        let bound: f32 = (0..cols)
                            .map(|c| deq[j * cols + c].abs() * acts.d[(r * cols + c) / QK] / 2.0)
                            .sum();
                        let (g, e) = (got[r * rows + j], exact[r * rows + j]);
                        assert!(
                            (g - e).abs() <= bound * 1.01 + 1e-5,
                            "{dtype:?} {p:?} {isa:?} [{r},{j}]: {g} vs {e} (bound {bound})"
                        );
                    }
                }
            }
        }
    }
}

/// Large enough to be split over the pool, with a transposed write-back for n > 1; an odd
/// row count leaves the last task an odd number of rows.
#[test]
fn parallel_split_matches_the_scalar_reference() {
    let (rows, cols) = (1001, 576);
    let (k, _) = weight(rows, cols, GgmlDType::Q4_1, 7);
    for n in [1usize, 3, 8, 40] {
        let x = values(n * cols, 8);
        for p in [
            ActivationPrecision::F32,
            ActivationPrecision::Int8,
            ActivationPrecision::Int16,
        ] {
            let want = run(&k, &x, n, p, Isa::Scalar);
            let got = run(&k, &x, n, p, Isa::detect());
            assert_close(&got, &want, 1e-4, &format!("{p:?} n={n}"));
        }
    }
}

#[test]
fn activation_quantization_rounds_to_the_nearest_step_and_keeps_zero_blocks_zero() {
    let mut x = values(5 * QK, 9);
    x[QK..2 * QK].iter_mut().for_each(|v| *v = 0.0);
    // Exact ties (k + 0.5 steps) must round the same way on every path.
    x[3 * QK] = 127.0;
    x[3 * QK + 1] = 0.5;
    x[3 * QK + 2] = -2.5;
    let mut scalar = QuantRows::default();
    scalar.quantize(&x, 5 * QK, Isa::Scalar, false);
    for (i, &v) in x.iter().enumerate() {
        let d = scalar.d[i / QK];
        assert!(
            (scalar.q[i] as f32 * d - v).abs() <= d / 2.0 + 1e-7,
            "value {i}"
        );
    }
    assert_eq!(scalar.d[1], 0.0);
    assert!(scalar.q[QK..2 * QK].iter().all(|&q| q == 0));
    let isum: i32 = scalar.q[..QK].iter().map(|&q| q as i32).sum();
    assert_eq!(scalar.sum[0], scalar.d[0] * isum as f32);
    // The block's largest magnitude maps to ±127.
    assert!(scalar.q[..QK].iter().any(|&q| q.unsigned_abs() == 127));
    let mut wide = QuantRows::default();
    wide.quantize(&x, 5 * QK, Isa::Scalar, true);
    for (i, &v) in x.iter().enumerate() {
        let d = wide.d[i / QK];
        assert!(
            (wide.q16[i] as f32 * d - v).abs() <= d / 2.0 + 1e-7,
            "value {i}"
        );
    }
    assert!(wide.q16[..QK].iter().any(|&q| q.unsigned_abs() == 32767));
    for isa in isas() {
        let mut simd = QuantRows::default();
        simd.quantize(&x, 5 * QK, isa, false);
        assert_eq!(simd.q, scalar.q, "{isa:?}");
        assert_eq!(simd.d, scalar.d, "{isa:?}");
        assert_eq!(simd.sum, scalar.sum, "{isa:?}");
        simd.quantize(&x, 5 * QK, isa, true);
        assert_eq!(simd.q16, wide.q16, "{isa:?} int16");
        assert_eq!(simd.d, wide.d, "{isa:?} int16");
        assert_eq!(simd.sum, wide.sum, "{isa:?} int16");
    }
}

#[test]
fn the_forward_op_runs_both_precisions_on_tensors() {
    let (k, deq) = weight(16, 64, GgmlDType::Q8_0, 10);
    let x = Tensor::from_vec(values(3 * 64, 11), (3, 64), &Device::Cpu).unwrap();
    let want = x.matmul(&deq.t().unwrap()).unwrap();
    for p in [
        ActivationPrecision::F32,
        ActivationPrecision::Int8,
        ActivationPrecision::Int16,
    ] {
        let got = k.forward(&x, p).unwrap();
        let diff: f32 = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 0.05, "{p:?}: {diff}");
    }
}

#[test]
fn unsupported_formats_are_left_to_candle() {
    let w = Tensor::zeros((4, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
    assert!(QWeight::from_qtensor(&q).unwrap().is_none());
}

#[test]
fn precision_names_parse() {
    assert_eq!("int8".parse(), Ok(ActivationPrecision::Int8));
    assert_eq!("f32".parse(), Ok(ActivationPrecision::F32));
    assert_eq!("int16".parse(), Ok(ActivationPrecision::Int16));
    assert!("fp16".parse::<ActivationPrecision>().is_err());
}

/// q/k/v-style fused calls equal one call per weight, for every precision and a row count
/// that is split over the pool.
#[test]
fn fused_matmuls_equal_separate_ones() {
    let cols = 576;
    let (a, _) = weight(600, cols, GgmlDType::Q4_1, 12);
    let (b, _) = weight(200, cols, GgmlDType::Q8_0, 13);
    // 40 rows: more than one panel of the strip kernel.
    for n in [1usize, 3, 40] {
        let x = values(n * cols, 14);
        for p in [
            ActivationPrecision::F32,
            ActivationPrecision::Int8,
            ActivationPrecision::Int16,
        ] {
            let (mut oa, mut ob) = (vec![0f32; n * 600], vec![0f32; n * 200]);
            matmul_multi(&[&a, &b], &x, n, &mut [&mut oa, &mut ob], p, Isa::detect());
            assert_eq!(oa, run(&a, &x, n, p, Isa::detect()), "{p:?} n={n}");
            assert_eq!(ob, run(&b, &x, n, p, Isa::detect()), "{p:?} n={n}");
        }
    }
}

/// Where the CPU has AVX2 every weight gets a strip copy and `Auto` runs the strip kernel
/// (int16) at every row count; elsewhere `Auto` stays int16 below 4 rows, f32 above.
#[test]
fn auto_takes_the_strip_kernel_where_the_cpu_has_it() {
    let cols = 96;
    let (k, _) = weight(40, cols, GgmlDType::Q4_1, 15);
    let strips = Isa::detect() >= Isa::Avx2;
    assert_eq!(k.strips.is_some(), strips);
    for n in [1usize, 4, 9] {
        let x = values(n * cols, 16);
        let auto = run(&k, &x, n, ActivationPrecision::Auto, Isa::detect());
        let want = if strips || n < AUTO_F32_FROM_ROWS {
            ActivationPrecision::Int16
        } else {
            ActivationPrecision::F32
        };
        assert_eq!(auto, run(&k, &x, n, want, Isa::detect()), "n={n}");
    }
}

/// The strip layout is a permutation: GGUF blocks → strips → GGUF blocks gives the same bytes,
/// including a partial last strip; and a weight holding only strips still dequantizes and
/// runs the f32 and int8 paths (which rebuild the GGUF blocks on first use).
#[test]
fn strips_round_trip_to_gguf_blocks() {
    for dtype in FORMATS {
        for rows in [1usize, 16, 37] {
            let cols = 3 * QK;
            let w = Tensor::from_vec(values(rows * cols, 17), (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let data = q.data().unwrap().into_owned();
            let format = BlockFormat::from_ggml(dtype).unwrap();
            let s = strips::Strips::build(format, &data, rows, cols);
            assert_eq!(s.to_gguf(format, rows, cols), data, "{dtype:?} rows={rows}");
        }
        let (k, deq) = weight(37, 96, dtype, 18);
        let deq: Vec<f32> = deq.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(k.dequantize(), deq, "{dtype:?} dequantize");
    }
}
