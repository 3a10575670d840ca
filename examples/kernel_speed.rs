//! Micro-benchmark of the block matmul kernel alone (one 1536x576 matrix, 1 and 8 rows):
//! `RAYON_NUM_THREADS=1 cargo run --release --example kernel_speed`.
use adapterd::engine::model::qmatmul::QWeight;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let (rows, cols) = (1536usize, 576usize);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0)
        .collect();
    let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    for dt in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let q = QTensor::quantize(&w, dt).unwrap();
        let k = QWeight::from_qtensor(&q).unwrap().unwrap();
        for n in [1usize, 8] {
            let x: Vec<f32> = (0..n * cols).map(|i| (i % 7) as f32).collect();
            let mut out = vec![0f32; n * rows];
            let reps = 2000;
            let t = Instant::now();
            for _ in 0..reps {
                k.matmul_slice(&x, n, &mut out);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{dt:?} n={n}: {:.1} us/call, {:.2} GMAC/s",
                s * 1e6,
                (rows * cols * n) as f64 / s / 1e9
            );
        }
    }
}
