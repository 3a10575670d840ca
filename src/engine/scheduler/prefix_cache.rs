//! Prompt-prefix reuse: the keys and values of prompts already read (and of finished replies),
//! kept in blocks of [`BLOCK`] tokens — copied out of the sequences' caches when a prefill of
//! an uncached prompt ends and when a sequence finishes (the engine decides which) — so a new
//! request whose prompt starts with one of them (the chat template and a system prompt, a
//! few-shot preamble, a conversation's earlier turns) skips that part of its prefill.
//!
//! Entries are found by the hash of each whole-block prefix and then compared token by token,
//! so a hash collision costs a miss, never a wrong cache. Reuse happens only within one scope
//! (the API passes one per tenant: another tenant's prompts must not even be detectable by
//! timing) and one adapter version (an adapter changes every layer's keys and values). The
//! budget is in bytes, least recently used first out.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Weak};

use candle_core::{Result, Tensor};

use crate::engine::lora::LoraAdapter;
use crate::engine::model::SeqCache;

/// Tokens per block: prefixes are reused in whole blocks.
pub const BLOCK: usize = 16;

/// Who may share an entry: the caller's scope and the adapter's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Scope {
    scope: u64,
    /// The resident adapter's address (0: the base). Entries hold a `Weak` to it, so the
    /// address cannot be reused by another adapter while the entry lives.
    adapter: usize,
}

impl Scope {
    fn of(scope: u64, adapter: Option<&Arc<LoraAdapter>>) -> Self {
        Self {
            scope,
            adapter: adapter.map_or(0, |a| Arc::as_ptr(a) as usize),
        }
    }
}

struct Entry {
    scope: Scope,
    adapter: Option<Weak<LoraAdapter>>,
    /// A whole number of blocks.
    tokens: Vec<u32>,
    /// Per layer (keys, values), each [kv_heads, tokens.len(), head_dim].
    kv: Vec<(Tensor, Tensor)>,
    bytes: usize,
    last_used: u64,
}

/// A hit: how many prompt tokens are already computed, and a cache holding them.
pub struct Hit {
    pub tokens: usize,
    pub cache: SeqCache,
}

pub struct PrefixCache {
    budget: usize,
    used: usize,
    clock: u64,
    next_id: u64,
    entries: HashMap<u64, Entry>,
    /// (scope, hash of a whole-block prefix) -> the newest entry that starts with it.
    index: HashMap<(Scope, u64), u64>,
}

/// Hashes of the prompt's whole-block prefixes: element `b` covers `tokens[..(b + 1) * BLOCK]`.
fn block_hashes(tokens: &[u32], blocks: usize) -> Vec<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (0..blocks)
        .map(|b| {
            tokens[b * BLOCK..(b + 1) * BLOCK].hash(&mut h);
            h.finish()
        })
        .collect()
}

impl PrefixCache {
    /// `budget`: bytes of keys and values kept at most (0: the cache is off).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            clock: 0,
            next_id: 0,
            entries: HashMap::new(),
            index: HashMap::new(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.used
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// The longest cached whole-block prefix of `prompt` in this scope, leaving at least one
    /// prompt token to compute (its logits choose the first new token).
    pub fn lookup(
        &mut self,
        scope: u64,
        adapter: Option<&Arc<LoraAdapter>>,
        prompt: &[u32],
    ) -> Result<Option<Hit>> {
        if self.budget == 0 || self.entries.is_empty() {
            return Ok(None);
        }
        let key = Scope::of(scope, adapter);
        let blocks = prompt.len().saturating_sub(1) / BLOCK;
        let hashes = block_hashes(prompt, blocks);
        for b in (0..blocks).rev() {
            let Some(&id) = self.index.get(&(key, hashes[b])) else {
                continue;
            };
            let len = (b + 1) * BLOCK;
            self.clock += 1;
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            if e.scope != key || e.tokens.len() < len || e.tokens[..len] != prompt[..len] {
                continue;
            }
            e.last_used = self.clock;
            let cache = SeqCache::from_prefix(&e.kv, len)?;
            return Ok(Some(Hit { tokens: len, cache }));
        }
        Ok(None)
    }

    /// Keeps the whole-block part of `prompt`, whose keys and values `cache` holds, unless an
    /// entry in this scope already starts with it. Older entries make room.
    pub fn insert(
        &mut self,
        scope: u64,
        adapter: Option<&Arc<LoraAdapter>>,
        prompt: &[u32],
        cache: &SeqCache,
    ) -> Result<()> {
        let blocks = prompt.len().min(cache.len()) / BLOCK;
        if self.budget == 0 || blocks == 0 {
            return Ok(());
        }
        let key = Scope::of(scope, adapter);
        let len = blocks * BLOCK;
        let hashes = block_hashes(prompt, blocks);
        self.clock += 1;
        if let Some(e) = self
            .index
            .get(&(key, hashes[blocks - 1]))
            .and_then(|id| self.entries.get_mut(id))
        {
            if e.scope == key && e.tokens.len() >= len && e.tokens[..len] == prompt[..len] {
                e.last_used = self.clock;
                return Ok(());
            }
        }
        let kv = cache.copy_prefix(len)?;
        let bytes: usize = kv
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum();
        if bytes > self.budget {
            return Ok(());
        }
        // Entries the new one extends (a conversation's earlier turns) are wholly inside it:
        // they go, and their blocks are found in the new entry.
        let mut subsumed: Vec<u64> = hashes
            .iter()
            .filter_map(|h| self.index.get(&(key, *h)).copied())
            .filter(|id| {
                self.entries.get(id).is_some_and(|e| {
                    e.scope == key
                        && e.tokens.len() <= len
                        && e.tokens[..] == prompt[..e.tokens.len()]
                })
            })
            .collect();
        subsumed.sort_unstable();
        subsumed.dedup();
        for id in subsumed {
            self.remove(id);
        }
        if self.used + bytes > self.budget {
            self.evict_orphans();
        }
        while self.used + bytes > self.budget {
            // Never spin in the engine thread: with nothing left to evict, keep nothing.
            if !self.evict_oldest() {
                return Ok(());
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        for h in &hashes {
            self.index.insert((key, *h), id);
        }
        self.used += bytes;
        self.entries.insert(
            id,
            Entry {
                scope: key,
                adapter: adapter.map(Arc::downgrade),
                tokens: prompt[..len].to_vec(),
                kv,
                bytes,
                last_used: self.clock,
            },
        );
        Ok(())
    }

    /// Entries whose adapter version is no longer resident can never be hit again (a reload
    /// is another allocation): they go before any live one.
    fn evict_orphans(&mut self) {
        let dead: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.adapter.as_ref().is_some_and(|w| w.strong_count() == 0))
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(e) = self.entries.remove(&id) {
            self.used -= e.bytes;
            self.index.retain(|_, v| *v != id);
        }
    }

    /// Whether there was an entry to evict.
    fn evict_oldest(&mut self) -> bool {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(&id, _)| id);
        if let Some(id) = oldest {
            self.remove(id);
        }
        oldest.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const LAYERS: usize = 2;

    /// A cache whose position `p` holds the value `token[p]` everywhere: what was cached is
    /// visible in the values.
    fn cache_of(tokens: &[u32]) -> SeqCache {
        let mut c = SeqCache::new(LAYERS);
        let n = tokens.len();
        let vals: Vec<f32> = (0..2)
            .flat_map(|_| tokens.iter().flat_map(|&t| [t as f32; 4]))
            .collect();
        let k = Tensor::from_vec(vals, (2, n, 4), &Device::Cpu).unwrap();
        for l in 0..LAYERS {
            c.append(l, &k, &k).unwrap();
        }
        c.advance(n);
        c
    }

    fn values(c: &SeqCache) -> Vec<f32> {
        let kv = c.copy_prefix(c.len()).unwrap();
        kv[0]
            .0
            .narrow(0, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| seed * 1000 + i).collect()
    }

    #[test]
    fn the_longest_whole_block_prefix_is_reused_and_one_token_is_left() {
        let mut pc = PrefixCache::new(1 << 20);
        let p = prompt(1, 40);
        pc.insert(7, None, &p, &cache_of(&p)).unwrap();
        // 40 tokens keep 2 blocks (32).
        assert_eq!(pc.bytes(), 2 * LAYERS * 2 * 32 * 4 * 4);
        // A prompt sharing 35 tokens reuses 32.
        let mut q = p[..35].to_vec();
        q.extend([5, 6, 7]);
        let hit = pc.lookup(7, None, &q).unwrap().unwrap();
        assert_eq!(hit.tokens, 32);
        assert_eq!(hit.cache.len(), 32);
        let want: Vec<f32> = p[..32].iter().flat_map(|&t| [t as f32; 4]).collect();
        assert_eq!(values(&hit.cache), want);
        // Exactly 32 tokens: reusing all 32 would leave nothing to compute, so 16.
        assert_eq!(pc.lookup(7, None, &p[..32]).unwrap().unwrap().tokens, 16);
        // Shorter than a block, or different from the first token on: nothing.
        assert!(pc.lookup(7, None, &p[..16]).unwrap().is_none());
        assert!(pc.lookup(7, None, &prompt(2, 40)).unwrap().is_none());
    }

    #[test]
    fn scopes_and_adapters_do_not_share() {
        let mut pc = PrefixCache::new(1 << 20);
        let p = prompt(1, 40);
        pc.insert(7, None, &p, &cache_of(&p)).unwrap();
        assert!(pc.lookup(8, None, &p).unwrap().is_none(), "another tenant");
        let a = LoraAdapter::empty_for_tests(0);
        assert!(pc.lookup(7, Some(&a), &p).unwrap().is_none(), "an adapter");
        pc.insert(7, Some(&a), &p, &cache_of(&p)).unwrap();
        assert!(pc.lookup(7, Some(&a), &p).unwrap().is_some());
        assert!(pc.lookup(7, None, &p).unwrap().is_some());
    }

    #[test]
    fn an_entry_that_extends_another_replaces_it() {
        let mut pc = PrefixCache::new(1 << 20);
        let per_token = 2 * LAYERS * 2 * 4 * 4;
        let turn2 = prompt(1, 70);
        let turn1 = &turn2[..40];
        pc.insert(0, None, turn1, &cache_of(turn1)).unwrap();
        assert_eq!(pc.bytes(), 32 * per_token);
        pc.insert(0, None, &turn2, &cache_of(&turn2)).unwrap();
        // Only the longer entry is left, and it serves both.
        assert_eq!(pc.bytes(), 64 * per_token);
        assert_eq!(pc.lookup(0, None, turn1).unwrap().unwrap().tokens, 32);
        assert_eq!(pc.lookup(0, None, &turn2).unwrap().unwrap().tokens, 64);
        // A different continuation of the same start is not inside it: both stay.
        let mut other = turn2[..20].to_vec();
        other.extend(prompt(2, 30));
        pc.insert(0, None, &other, &cache_of(&other)).unwrap();
        assert_eq!(pc.bytes(), (64 + 48) * per_token);
        // Nor is another scope's entry.
        pc.insert(9, None, turn1, &cache_of(turn1)).unwrap();
        pc.insert(9, None, &turn2, &cache_of(&turn2)).unwrap();
        assert_eq!(pc.bytes(), (64 + 48 + 64) * per_token);
        assert!(pc.lookup(0, None, &turn2).unwrap().is_some());
    }

    #[test]
    fn entries_of_an_unloaded_adapter_go_first() {
        let entry = 2 * LAYERS * 2 * 32 * 4 * 4;
        let mut pc = PrefixCache::new(2 * entry);
        let (a, b, c) = (prompt(1, 33), prompt(2, 33), prompt(3, 33));
        let gone = LoraAdapter::empty_for_tests(0);
        pc.insert(0, None, &a, &cache_of(&a)).unwrap();
        pc.insert(0, Some(&gone), &b, &cache_of(&b)).unwrap();
        drop(gone);
        // `a` is the least recently used, but `b`'s adapter is gone: `b` makes room.
        pc.insert(0, None, &c, &cache_of(&c)).unwrap();
        assert!(pc.lookup(0, None, &a).unwrap().is_some());
        assert!(pc.lookup(0, None, &c).unwrap().is_some());
        assert_eq!(pc.bytes(), 2 * entry);
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used() {
        let entry = 2 * LAYERS * 2 * 32 * 4 * 4;
        let mut pc = PrefixCache::new(2 * entry);
        let (a, b, c) = (prompt(1, 33), prompt(2, 33), prompt(3, 33));
        pc.insert(0, None, &a, &cache_of(&a)).unwrap();
        pc.insert(0, None, &b, &cache_of(&b)).unwrap();
        assert!(
            pc.lookup(0, None, &a).unwrap().is_some(),
            "a is now newer than b"
        );
        pc.insert(0, None, &c, &cache_of(&c)).unwrap();
        assert_eq!(pc.bytes(), 2 * entry);
        assert!(pc.lookup(0, None, &b).unwrap().is_none(), "b was evicted");
        assert!(pc.lookup(0, None, &a).unwrap().is_some());
        assert!(pc.lookup(0, None, &c).unwrap().is_some());
        // Inserting what is already there copies nothing.
        pc.insert(0, None, &c, &cache_of(&c)).unwrap();
        assert_eq!(pc.bytes(), 2 * entry);
        // Larger than the whole budget: not kept; a zero budget keeps nothing.
        let big = prompt(4, 200);
        pc.insert(0, None, &big, &cache_of(&big)).unwrap();
        assert!(pc.lookup(0, None, &big).unwrap().is_none());
        let mut off = PrefixCache::new(0);
        off.insert(0, None, &a, &cache_of(&a)).unwrap();
        assert_eq!(off.bytes(), 0);
    }
}
