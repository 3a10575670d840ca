//! Per-sequence KV cache: one growing buffer per layer for keys and values, laid out
//! [kv_heads, positions, head_dim]. Each sequence owns its cache, so sequences of different
//! lengths share a batch without padding.

use candle_core::{Result, Tensor};
use candle_nn::kv_cache::KvCache;

/// Positions reserved at a time; a cache grows by this much when full, so short requests stay
/// small and long ones do not copy on every token.
const GROW_BY: usize = 128;

/// `t` in storage of its own: a view into the growing cache buffer would keep the whole
/// buffer alive.
fn owned(t: Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        t.copy()
    } else {
        t.contiguous()
    }
}

#[derive(Debug, Clone)]
pub struct SeqCache {
    layers: Vec<KvCache>,
    len: usize,
}

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| KvCache::new(1, GROW_BY)).collect(),
            len: 0,
        }
    }

    /// Number of positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` ([kv_heads, n, head_dim]) to `layer` and returns all keys and values so far.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let cache = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("no cache for layer {layer}")))?;
        cache.append(k, v)
    }

    /// Called once per forward, after every layer has appended `n` positions.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// An owned copy of every layer's keys and values for positions `0..len`, each
    /// [kv_heads, len, head_dim]: what a prefix cache keeps after the cache itself is gone.
    pub fn copy_prefix(&self, len: usize) -> Result<Vec<(Tensor, Tensor)>> {
        if len > self.len {
            candle_core::bail!("prefix of {len} positions from a cache of {}", self.len);
        }
        self.layers
            .iter()
            .map(|c| {
                let (Some(k), Some(v)) = (c.k()?, c.v()?) else {
                    candle_core::bail!("copying the prefix of an empty cache");
                };
                Ok((owned(k.narrow(1, 0, len)?)?, owned(v.narrow(1, 0, len)?)?))
            })
            .collect()
    }

    /// A cache holding the first `len` positions of `prefix` (as from [`Self::copy_prefix`]),
    /// with room reserved for what follows.
    pub fn from_prefix(prefix: &[(Tensor, Tensor)], len: usize) -> Result<Self> {
        let capacity = len.div_ceil(GROW_BY).max(1) * GROW_BY;
        let layers = prefix
            .iter()
            .map(|(k, v)| {
                let mut c = KvCache::new(1, capacity);
                c.append(
                    &k.narrow(1, 0, len)?.contiguous()?,
                    &v.narrow(1, 0, len)?.contiguous()?,
                )?;
                Ok(c)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, len })
    }
}
