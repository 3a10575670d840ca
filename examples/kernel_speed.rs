//! Micro-benchmark of the block matmul kernel alone: 1536x576 and 576x1536 matrices (the MLP's shapes) at 1,
//! 2, 4, 8 and 16 input rows, for every format, precision and instruction set this CPU has, on one
//! thread: `cargo run --release --example kernel_speed [-- REPS [FILTER]]`. FILTER keeps only
//! lines containing it (e.g. "Q4_1 n=8 Int8 Avx512Vnni"). Speeds come from the thread's CPU
//! time, which — unlike wall time — does not count the slices other processes take on a shared
//! machine; wall time is printed beside it.

use adapterd::engine::model::qmatmul::{ActivationPrecision, Isa, QWeight};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let reps: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 2000,
    };
    let filter = std::env::args().nth(2).unwrap_or_default();
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()?
        .install(|| {
            // The MLP's gate/up shape, then down's, whose 1536-wide rows of 8 inputs no longer
            // fit the L1 cache.
            run(reps, &filter, 1536, 576)?;
            run(reps, &filter, 576, 1536)
        })
}

fn run(reps: usize, filter: &str, rows: usize, cols: usize) -> anyhow::Result<()> {
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0)
        .collect();
    let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu)?;
    let isas: Vec<Isa> = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
        .into_iter()
        .filter(|i| i.is_available())
        .collect();
    for dt in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let q = QTensor::quantize(&w, dt)?;
        let k = QWeight::from_qtensor(&q)?
            .ok_or_else(|| anyhow::anyhow!("{dt:?} not covered by the kernel"))?;
        for n in [1usize, 2, 4, 8, 16] {
            let x: Vec<f32> = (0..n * cols).map(|i| (i % 7) as f32 - 3.0).collect();
            let mut out = vec![0f32; n * rows];
            for p in [
                ActivationPrecision::F32,
                ActivationPrecision::Int8,
                ActivationPrecision::Int16,
            ] {
                for &isa in &isas {
                    let name = format!("{rows}x{cols} {dt:?} n={n} {p:?} {isa:?}");
                    if !name.contains(filter) {
                        continue;
                    }
                    // The scalar paths are ~20x slower: fewer repetitions keep the run short.
                    let reps = if isa == Isa::Scalar {
                        reps / 20 + 1
                    } else {
                        reps
                    };
                    k.matmul_with(&x, n, &mut out, p, isa);
                    let (t, c) = (Instant::now(), thread_cpu_secs());
                    for _ in 0..reps {
                        k.matmul_with(&x, n, &mut out, p, isa);
                    }
                    let s = (thread_cpu_secs() - c) / reps as f64;
                    let wall = t.elapsed().as_secs_f64() / reps as f64;
                    println!(
                        "{rows}x{cols} {dt:?} n={n} {:>5} {:>10}: {:8.1} us/call (wall {:8.1}), {:6.2} GMAC/s",
                        format!("{p:?}"),
                        format!("{isa:?}"),
                        s * 1e6,
                        wall * 1e6,
                        (rows * cols * n) as f64 / s / 1e9
                    );
                }
            }
        }
    }
    Ok(())
}

/// CPU time consumed by this thread, in seconds.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
