//! Attention of new tokens over a sequence's KV cache, fused into one CPU pass per query
//! token (scores, softmax, weighted sum of values) instead of a dozen tensor ops.
//!
//! Why: in batched decode each sequence attends over its own cache, and the tensor version
//! costs ~12 op dispatches and allocations per sequence and layer (~2,900 per step at 8
//! sequences) for a few thousand multiply-adds each. For prompts the tensor version
//! multiplies every query by every key and then masks half of the scores away; here query i
//! reads only keys 0..=start+i, and the softmax's exp is a vectorized polynomial instead of a
//! libm call per score. Other devices keep the tensor path.

use candle_core::{CpuStorage, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::engine::sampling::exp_neg;

/// `q` [n, heads, head_dim] (the n new tokens at positions start..start+n) against `k_all`,
/// `v_all` [kv_heads, start+n, head_dim] (any strides, as the cache's views have): query i
/// sees keys 0..=start+i, and query head h reads kv head h / group. Returns [n, heads ·
/// head_dim], or `None` when a tensor is not f32 on the CPU.
pub fn attention_cpu(
    q: &[f32],
    k_all: &Tensor,
    v_all: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Option<Vec<f32>>> {
    let (kv_heads, len, hd) = k_all.dims3()?;
    let width = heads * hd;
    if v_all.dims3()? != (kv_heads, len, hd)
        || width == 0
        || !q.len().is_multiple_of(width)
        || q.len() / width > len
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
    {
        candle_core::bail!(
            "attention: q {} values for {heads} heads, k {:?}, v {:?}",
            q.len(),
            k_all.dims(),
            v_all.dims()
        );
    }
    let n = q.len() / width;
    let ((k_store, k_layout), (v_store, v_layout)) =
        (k_all.storage_and_layout(), v_all.storage_and_layout());
    let (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) =
        (&*k_store, &*v_store)
    else {
        return Ok(None);
    };
    let (ks, vs) = (k_layout.stride(), v_layout.stride());
    // Rows of head_dim values must be contiguous; the cache's views always are.
    if ks[2] != 1 || vs[2] != 1 {
        return Ok(None);
    }
    let (k0, v0) = (k_layout.start_offset(), v_layout.start_offset());
    let last = |start: usize, s: &[usize]| start + (kv_heads - 1) * s[0] + (len - 1) * s[1] + hd;
    if len == 0 || last(k0, ks) > k.len() || last(v0, vs) > v.len() {
        candle_core::bail!("attention: cache views outside their storage");
    }
    let view = CacheView {
        k,
        v,
        k0,
        v0,
        ks: [ks[0], ks[1]],
        vs: [vs[0], vs[1]],
        len,
        hd,
    };
    let group = heads / kv_heads;
    let start = len - n;
    let mut out = vec![0f32; n * width];
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let row = |i: usize, q_row: &[f32], o_row: &mut [f32]| {
        let seen = CacheView {
            len: start + i + 1,
            ..view
        };
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the features were detected above.
            unsafe { attend_avx2(q_row, &seen, group, scale, o_row) };
            return;
        }
        attend(q_row, &seen, group, scale, o_row);
    };
    if n == 1 {
        row(0, q, &mut out);
    } else {
        // Later queries see more keys; small chunks keep the pool balanced.
        out.par_chunks_mut(width)
            .zip(q.par_chunks(width))
            .enumerate()
            .with_min_len(4)
            .for_each(|(i, (o, qr))| row(i, qr, o));
    }
    Ok(Some(out))
}

/// One sequence's keys and values as slices with the strides of its cache views (checked
/// in bounds by the caller).
#[derive(Clone, Copy)]
struct CacheView<'a> {
    k: &'a [f32],
    v: &'a [f32],
    k0: usize,
    v0: usize,
    ks: [usize; 2],
    vs: [usize; 2],
    len: usize,
    hd: usize,
}

/// The same loops compiled for AVX2 and FMA (the portable build targets SSE2 only).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(q: &[f32], c: &CacheView<'_>, group: usize, scale: f32, out: &mut [f32]) {
    attend(q, c, group, scale, out)
}

#[inline(always)]
fn attend(q: &[f32], c: &CacheView<'_>, group: usize, scale: f32, out: &mut [f32]) {
    let (hd, len) = (c.hd, c.len);
    // Scores of the group's query heads, head-major: each key and value row is read once
    // per kv head for all the query heads that share it, not once per query head.
    let mut p = vec![0f32; group * len];
    for (kvh, (qg, og)) in q
        .chunks_exact(group * hd)
        .zip(out.chunks_exact_mut(group * hd))
        .enumerate()
    {
        let key = |j: usize| &c.k[c.k0 + kvh * c.ks[0] + j * c.ks[1]..][..hd];
        let value = |j: usize| &c.v[c.v0 + kvh * c.vs[0] + j * c.vs[1]..][..hd];
        for j in 0..len {
            let k = key(j);
            for (g, qh) in qg.chunks_exact(hd).enumerate() {
                p[g * len + j] = dot(qh, k) * scale;
            }
        }
        for pg in p.chunks_exact_mut(len) {
            let max = pg.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let inv = 1.0 / exp_shifted(pg, max);
            for v in pg.iter_mut() {
                *v *= inv;
            }
        }
        for j in 0..len {
            let v = value(j);
            for (g, oh) in og.chunks_exact_mut(hd).enumerate() {
                let w = p[g * len + j];
                for (o, x) in oh.iter_mut().zip(v) {
                    *o += w * x;
                }
            }
        }
    }
}

/// Replaces every x in `p` by e^(x − max) and returns their sum, with the sampler's
/// polynomial exp ([`exp_neg`]): it vectorizes where this is inlined, while libm's `expf` is a
/// call per score, and at 500 tokens of context that was the softmax's whole cost.
#[inline(always)]
fn exp_shifted(p: &mut [f32], max: f32) -> f32 {
    let mut sum = [0f32; 8];
    let exp = |x: f32| exp_neg(x - max);
    let mut chunks = p.chunks_exact_mut(8);
    for ch in &mut chunks {
        for (v, s) in ch.iter_mut().zip(sum.iter_mut()) {
            *v = exp(*v);
            *s += *v;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v);
        tail += *v;
    }
    sum.iter().sum::<f32>() + tail
}

/// A dot product in eight independent lanes, so the compiler can vectorise it without
/// reassociating a single running sum.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (ca, cb) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Against the tensor composition the model uses on other devices (scores, causal mask,
    /// softmax, values), on strided views like the cache's (a narrow of a larger buffer),
    /// with grouped heads: one new token, and several new tokens after a cached prefix.
    #[test]
    fn matches_the_tensor_ops_on_strided_cache_views() {
        let dev = Device::Cpu;
        let (heads, kv_heads, hd, len, cap) = (6, 2, 16, 11, 20);
        let group = heads / kv_heads;
        let k_buf =
            Tensor::from_vec(values(kv_heads * cap * hd, 1), (kv_heads, cap, hd), &dev).unwrap();
        let v_buf =
            Tensor::from_vec(values(kv_heads * cap * hd, 2), (kv_heads, cap, hd), &dev).unwrap();
        let (k_all, v_all) = (
            k_buf.narrow(1, 0, len).unwrap(),
            v_buf.narrow(1, 0, len).unwrap(),
        );
        let scale = 0.25f32;
        for n in [1usize, 5, len] {
            let start = len - n;
            let q = values(n * heads * hd, 3);
            let got = attention_cpu(&q, &k_all, &v_all, heads, scale)
                .unwrap()
                .expect("CPU path");

            // [n, heads, hd] -> [kv_heads, group·n, hd], query rows of a kv head stacked.
            let q_g = Tensor::from_vec(q.clone(), (n, heads, hd), &dev)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((kv_heads, group * n, hd))
                .unwrap();
            let scores = (q_g.matmul(&k_all.t().unwrap()).unwrap() * scale as f64).unwrap();
            let mask = crate::engine::model::llama::causal_mask(n, start, &dev).unwrap();
            let scores = scores
                .reshape((kv_heads, group, n, len))
                .unwrap()
                .broadcast_add(&mask)
                .unwrap()
                .reshape((kv_heads, group * n, len))
                .unwrap();
            let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
            let want: Vec<f32> = probs
                .matmul(&v_all)
                .unwrap()
                .reshape((heads, n, hd))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-5, "n={n} [{i}]: {g} vs {w}");
            }
        }
    }

    /// The polynomial exp against libm over the range softmax feeds it (and far below it,
    /// where both are ~0), relative error within a few ulp.
    #[test]
    fn exp_shifted_matches_libm() {
        let xs: Vec<f32> = (0..4000).map(|i| -(i as f32) * 0.025).collect();
        let mut got = xs.clone();
        let sum = exp_shifted(&mut got, 0.0);
        let mut want_sum = 0f64;
        for (g, x) in got.iter().zip(&xs) {
            let w = x.exp();
            want_sum += w as f64;
            assert!(
                (g - w).abs() <= 4.0 * f32::EPSILON * w + 1e-37,
                "exp({x}): {g} vs {w}"
            );
        }
        assert!((sum as f64 - want_sum).abs() < 1e-5 * want_sum);
        let mut shifted = vec![3.0f32, 1.0, -200.0];
        exp_shifted(&mut shifted, 3.0);
        assert_eq!(shifted[0], 1.0);
        assert!((shifted[1] - (-2f32).exp()).abs() < 1e-7 && shifted[2] < 1e-37);
    }

    #[test]
    fn mismatched_shapes_are_an_error_not_a_panic() {
        let dev = Device::Cpu;
        let k = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &dev).unwrap();
        let v = Tensor::zeros((2, 3, 5), candle_core::DType::F32, &dev).unwrap();
        assert!(attention_cpu(&[0.0; 8], &k, &v, 2, 1.0).is_err());
        let v = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &dev).unwrap();
        // 3 query heads cannot share 2 kv heads.
        assert!(attention_cpu(&[0.0; 12], &k, &v, 3, 1.0).is_err());
        assert!(attention_cpu(&[0.0; 7], &k, &v, 2, 1.0).is_err());
        // More new tokens than the cache holds.
        assert!(attention_cpu(&[0.0; 32], &k, &v, 2, 1.0).is_err());
    }
}
