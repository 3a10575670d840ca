//! Attention of one new token over a sequence's KV cache, fused into one CPU pass (scores,
//! softmax, weighted sum of values) instead of a dozen tensor ops.
//!
//! Why: in batched decode each sequence attends over its own cache, and the tensor version
//! costs ~12 op dispatches and allocations per sequence and layer (~2,900 per step at 8
//! sequences) for a few thousand multiply-adds each. The tensor path stays for prompts
//! (several new tokens, causal mask) and for other devices.

use candle_core::{CpuStorage, Result, Storage, Tensor};

/// `q` [heads, head_dim] (one token) against `k_all`, `v_all` [kv_heads, len, head_dim] (any
/// strides, as the cache's views have), where query head h reads kv head h / group.
/// Returns [heads · head_dim] in head order, or `None` when a tensor is not f32 on the CPU.
pub fn decode_attention_cpu(
    q: &[f32],
    k_all: &Tensor,
    v_all: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Option<Vec<f32>>> {
    let (kv_heads, len, hd) = k_all.dims3()?;
    if v_all.dims3()? != (kv_heads, len, hd)
        || q.len() != heads * hd
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
    {
        candle_core::bail!(
            "decode attention: q {} values for {heads} heads, k {:?}, v {:?}",
            q.len(),
            k_all.dims(),
            v_all.dims()
        );
    }
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
        candle_core::bail!("decode attention: cache views outside their storage");
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
    let mut out = vec![0f32; heads * hd];
    let group = heads / kv_heads;
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        unsafe { attend_avx2(q, &view, group, scale, &mut out) };
        return Ok(Some(out));
    }
    attend(q, &view, group, scale, &mut out);
    Ok(Some(out))
}

/// One sequence's keys and values as slices with the strides of its cache views (checked
/// in bounds by the caller).
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
    let hd = c.hd;
    let mut p = vec![0f32; c.len];
    for (h, (qh, oh)) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).enumerate() {
        let kvh = h / group;
        let key = |j: usize| &c.k[c.k0 + kvh * c.ks[0] + j * c.ks[1]..][..hd];
        let value = |j: usize| &c.v[c.v0 + kvh * c.vs[0] + j * c.vs[1]..][..hd];
        let mut max = f32::NEG_INFINITY;
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = dot(qh, key(j)) * scale;
            max = max.max(*pj);
        }
        let mut sum = 0f32;
        for pj in p.iter_mut() {
            *pj = (*pj - max).exp();
            sum += *pj;
        }
        let inv = 1.0 / sum;
        for (j, pj) in p.iter().enumerate() {
            let w = pj * inv;
            for (o, x) in oh.iter_mut().zip(value(j)) {
                *o += w * x;
            }
        }
    }
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

    /// Against the tensor composition the model used before, on strided views like the
    /// cache's (a narrow of a larger buffer), with grouped heads.
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
        let q = values(heads * hd, 3);
        let scale = 0.25f32;
        let got = decode_attention_cpu(&q, &k_all, &v_all, heads, scale)
            .unwrap()
            .expect("CPU path");

        let q_g = Tensor::from_vec(q.clone(), (kv_heads, group, hd), &dev).unwrap();
        let scores = (q_g.matmul(&k_all.t().unwrap()).unwrap() * scale as f64).unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let want: Vec<f32> = probs
            .matmul(&v_all)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error_not_a_panic() {
        let dev = Device::Cpu;
        let k = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &dev).unwrap();
        let v = Tensor::zeros((2, 3, 5), candle_core::DType::F32, &dev).unwrap();
        assert!(decode_attention_cpu(&[0.0; 8], &k, &v, 2, 1.0).is_err());
        let v = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &dev).unwrap();
        // 3 query heads cannot share 2 kv heads.
        assert!(decode_attention_cpu(&[0.0; 12], &k, &v, 3, 1.0).is_err());
        assert!(decode_attention_cpu(&[0.0; 7], &k, &v, 2, 1.0).is_err());
    }
}
