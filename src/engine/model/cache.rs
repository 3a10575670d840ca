//! Per-sequence KV cache: one growing buffer per layer for keys and values, laid out
//! [kv_heads, positions, head_dim]. Each sequence owns its cache, so sequences of different
//! lengths share a batch without padding.

use candle_core::{Result, Tensor};
use candle_nn::kv_cache::KvCache;

/// Positions reserved at a time; a cache grows by this much when full, so short requests stay
/// small and long ones do not copy on every token.
const GROW_BY: usize = 128;

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
}
