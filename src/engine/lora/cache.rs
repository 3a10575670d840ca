//! Resident adapters: an LRU cache bounded in bytes. A request holds its adapter through an
//! `Arc`, so evicting (or deleting) an adapter never disturbs a request already running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::LoraAdapter;

/// (tenant, name, version)
pub type AdapterKey = (String, String, i64);

struct Entry {
    adapter: Arc<LoraAdapter>,
    bytes: usize,
    last_used: u64,
}

pub struct AdapterCache {
    budget_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<AdapterKey, Entry>,
    bytes: usize,
    clock: u64,
}

impl AdapterCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map inconsistent (every update is a
        // single insert/remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &AdapterKey) -> Option<Arc<LoraAdapter>> {
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        g.entries.get_mut(key).map(|e| {
            e.last_used = now;
            e.adapter.clone()
        })
    }

    /// Inserts and evicts least-recently-used entries until the budget holds; returns how many
    /// were evicted. An adapter larger than the whole budget is still returned to its caller,
    /// just not kept.
    pub fn insert(&self, key: AdapterKey, adapter: Arc<LoraAdapter>) -> usize {
        let bytes = adapter.size_bytes;
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        if let Some(old) = g.entries.remove(&key) {
            g.bytes -= old.bytes;
        }
        if bytes > self.budget_bytes {
            return 0;
        }
        let mut evicted = 0;
        while g.bytes + bytes > self.budget_bytes {
            let Some(victim) = g
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = g.entries.remove(&victim) {
                g.bytes -= e.bytes;
                evicted += 1;
            }
        }
        g.bytes += bytes;
        g.entries.insert(
            key,
            Entry {
                adapter,
                bytes,
                last_used: now,
            },
        );
        evicted
    }

    /// Drops every cached version of (tenant, name).
    pub fn remove_all(&self, tenant: &str, name: &str) {
        let mut g = self.lock();
        let keys: Vec<AdapterKey> = g
            .entries
            .keys()
            .filter(|(t, n, _)| t == tenant && n == name)
            .cloned()
            .collect();
        for k in keys {
            if let Some(e) = g.entries.remove(&k) {
                g.bytes -= e.bytes;
            }
        }
    }

    /// (resident adapters, bytes)
    pub fn usage(&self) -> (usize, usize) {
        let g = self.lock();
        (g.entries.len(), g.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(bytes: usize) -> Arc<LoraAdapter> {
        LoraAdapter::empty_for_tests(bytes)
    }

    fn key(n: &str) -> AdapterKey {
        ("t".into(), n.into(), 1)
    }

    #[test]
    fn the_least_recently_used_adapter_is_evicted_to_stay_in_budget() {
        let c = AdapterCache::new(100);
        c.insert(key("a"), adapter(40));
        c.insert(key("b"), adapter(40));
        assert!(c.get(&key("a")).is_some()); // b is now the oldest
        assert_eq!(c.insert(key("c"), adapter(40)), 1);
        assert!(c.get(&key("b")).is_none());
        assert!(c.get(&key("a")).is_some() && c.get(&key("c")).is_some());
        assert_eq!(c.usage(), (2, 80));
    }

    #[test]
    fn an_adapter_bigger_than_the_budget_is_not_kept() {
        let c = AdapterCache::new(10);
        assert_eq!(c.insert(key("big"), adapter(11)), 0);
        assert_eq!(c.usage(), (0, 0));
    }

    #[test]
    fn removing_a_name_drops_all_its_versions() {
        let c = AdapterCache::new(100);
        c.insert(("t".into(), "a".into(), 1), adapter(10));
        c.insert(("t".into(), "a".into(), 2), adapter(10));
        c.insert(("u".into(), "a".into(), 1), adapter(10));
        c.remove_all("t", "a");
        assert_eq!(c.usage(), (1, 10));
    }
}
