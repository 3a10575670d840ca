//! Adds the low-rank deltas of a batch's adapter groups to a projection's output in one pass
//! on the CPU: for each row of each group, t = A·x (rank values), then y += scale·B·t.
//!
//! Why not candle ops: per adapted projection and group, index_select, two matmuls, a scale and
//! index_add are five dispatches and five allocations for a few thousand multiply-adds; at 7
//! modules × 30 layers that was ~1000 ops per decode step and cost a third of single-stream
//! speed (BENCHMARKS.md). The arithmetic is tiny and the A/B reads are contiguous, so plain
//! loops the compiler vectorises do it without the dispatch. Other devices keep the tensor path.

use candle_core::{CpuStorage, Result, Storage, Tensor};

use super::LoraPair;

/// `ys` [n, out] plus, for each `(pair, rows)`, scale·B(A·xs[r]) on every listed row `r` of
/// `xs` [n, in]. CPU and f32 only; returns `None` when a tensor is elsewhere, so the caller
/// can use the tensor path.
pub fn add_deltas_cpu(
    ys: &Tensor,
    xs: &Tensor,
    groups: &[(&LoraPair, &[u32])],
) -> Result<Option<Tensor>> {
    if !ys.device().is_cpu() {
        return Ok(None);
    }
    let (n, out_dim) = ys.dims2()?;
    let (nx, in_dim) = xs.dims2()?;
    if nx != n {
        candle_core::bail!("lora delta: {nx} input rows for {n} output rows");
    }
    let mut y = ys.flatten_all()?.to_vec1::<f32>()?;
    let x = xs.contiguous()?;
    let (x_store, x_layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(x_all)) = &*x_store else {
        return Ok(None);
    };
    let Some((x0, x1)) = x_layout.contiguous_offsets() else {
        return Ok(None);
    };
    let x = &x_all[x0..x1];
    let mut t = Vec::new();
    for (pair, rows) in groups {
        let (rank, a_in) = pair.a.dims2()?;
        let (b_out, b_rank) = pair.b.dims2()?;
        if a_in != in_dim || b_out != out_dim || b_rank != rank {
            candle_core::bail!(
                "lora delta: A [{rank}, {a_in}] / B [{b_out}, {b_rank}] do not fit [{n}, {in_dim}] -> [{n}, {out_dim}]"
            );
        }
        let (a_store, a_layout) = pair.a.storage_and_layout();
        let (b_store, b_layout) = pair.b.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(a_all)), Storage::Cpu(CpuStorage::F32(b_all))) =
            (&*a_store, &*b_store)
        else {
            return Ok(None);
        };
        let (Some((a0, a1)), Some((b0, b1))) =
            (a_layout.contiguous_offsets(), b_layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        let (a, b) = (&a_all[a0..a1], &b_all[b0..b1]);
        let scale = pair.scale as f32;
        t.resize(rank, 0.0);
        for &r in rows.iter() {
            let r = r as usize;
            if r >= n {
                candle_core::bail!("lora delta: row {r} of {n}");
            }
            let xr = &x[r * in_dim..(r + 1) * in_dim];
            for (tj, aj) in t.iter_mut().zip(a.chunks_exact(in_dim)) {
                *tj = dot(aj, xr) * scale;
            }
            let yr = &mut y[r * out_dim..(r + 1) * out_dim];
            for (yo, bo) in yr.iter_mut().zip(b.chunks_exact(rank)) {
                *yo += dot(bo, &t);
            }
        }
    }
    Tensor::from_vec(y, (n, out_dim), ys.device()).map(Some)
}

/// A dot product in eight independent lanes, so the compiler can vectorise it without
/// reassociating a single running sum.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (ca, cb) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(p, q)| p * q).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_the_composed_tensor_ops_on_the_listed_rows_only() {
        let dev = Device::Cpu;
        let (n, d_in, d_out, rank) = (5, 37, 23, 4);
        let xs = Tensor::from_vec(values(n * d_in, 1), (n, d_in), &dev).unwrap();
        let ys = Tensor::from_vec(values(n * d_out, 2), (n, d_out), &dev).unwrap();
        let pair = |seed| LoraPair {
            a: Tensor::from_vec(values(rank * d_in, seed), (rank, d_in), &dev).unwrap(),
            b: Tensor::from_vec(values(d_out * rank, seed + 1), (d_out, rank), &dev).unwrap(),
            scale: 0.75,
        };
        let (p1, p2) = (pair(3), pair(5));
        let (rows1, rows2) = (vec![0u32, 3], vec![1u32, 4]);
        let got = add_deltas_cpu(&ys, &xs, &[(&p1, &rows1), (&p2, &rows2)])
            .unwrap()
            .expect("the CPU path");

        let mut want = ys.clone();
        for (p, rows) in [(&p1, &rows1), (&p2, &rows2)] {
            let idx = Tensor::from_vec(rows.clone(), rows.len(), &dev).unwrap();
            let x = xs.index_select(&idx, 0).unwrap();
            let delta = (x
                .matmul(&p.a.t().unwrap())
                .unwrap()
                .matmul(&p.b.t().unwrap())
                .unwrap()
                * p.scale)
                .unwrap();
            want = want.index_add(&idx, &delta, 0).unwrap();
        }
        let got = got.to_vec2::<f32>().unwrap();
        let want = want.to_vec2::<f32>().unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
        // Row 2 belongs to no group: untouched.
        assert_eq!(got[2], ys.to_vec2::<f32>().unwrap()[2]);
    }

    #[test]
    fn shapes_that_do_not_fit_are_an_error_not_a_panic() {
        let dev = Device::Cpu;
        let xs = Tensor::zeros((2, 8), candle_core::DType::F32, &dev).unwrap();
        let ys = Tensor::zeros((2, 6), candle_core::DType::F32, &dev).unwrap();
        let p = LoraPair {
            a: Tensor::zeros((2, 7), candle_core::DType::F32, &dev).unwrap(),
            b: Tensor::zeros((6, 2), candle_core::DType::F32, &dev).unwrap(),
            scale: 1.0,
        };
        assert!(add_deltas_cpu(&ys, &xs, &[(&p, &[0])]).is_err());
        let p = LoraPair {
            a: Tensor::zeros((2, 8), candle_core::DType::F32, &dev).unwrap(),
            b: Tensor::zeros((6, 2), candle_core::DType::F32, &dev).unwrap(),
            scale: 1.0,
        };
        assert!(add_deltas_cpu(&ys, &xs, &[(&p, &[5])]).is_err());
    }
}
