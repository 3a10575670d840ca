//! `limits.tokens_per_minute`: a token bucket per tenant. A generation request reserves its
//! prompt tokens plus `max_new_tokens` when it is admitted and gets back what it did not
//! generate when it ends. A request is admitted while the tenant's balance is positive, so one
//! large request may take the balance below zero; the tenant then waits (429, `Retry-After`)
//! until the refill has paid the debt. The bucket holds at most one minute's tokens.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

struct Bucket {
    balance: f64,
    updated: Instant,
}

pub struct TokenRate {
    per_minute: u64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl TokenRate {
    /// `per_minute` 0 turns the limit off.
    pub fn new(per_minute: u64) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.per_minute > 0
    }

    fn per_second(&self) -> f64 {
        self.per_minute as f64 / 60.0
    }

    /// Takes `cost` tokens from `tenant`'s bucket, or says in how many seconds the balance will
    /// be positive again.
    pub fn charge(&self, tenant: &str, cost: usize, now: Instant) -> Result<(), u64> {
        if !self.enabled() {
            return Ok(());
        }
        let cap = self.per_minute as f64;
        let rate = self.per_second();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let b = buckets.entry(tenant.to_owned()).or_insert(Bucket {
            balance: cap,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.balance = (b.balance + elapsed * rate).min(cap);
        b.updated = now;
        if b.balance <= 0.0 {
            // Seconds until the balance is above zero again (at least one token's worth).
            let wait = ((1.0 - b.balance) / rate).ceil();
            return Err(if wait.is_finite() {
                (wait as u64).max(1)
            } else {
                60
            });
        }
        b.balance -= cost as f64;
        Ok(())
    }

    /// Gives back tokens a request reserved but did not use.
    pub fn refund(&self, tenant: &str, tokens: usize) {
        if !self.enabled() || tokens == 0 {
            return;
        }
        let cap = self.per_minute as f64;
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = buckets.get_mut(tenant) {
            b.balance = (b.balance + tokens as f64).min(cap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_tenant_in_debt_waits_for_the_refill_and_others_do_not() {
        let rate = TokenRate::new(600); // 10 tokens a second
        let t0 = Instant::now();
        rate.charge("a", 500, t0).unwrap();
        rate.charge("a", 400, t0)
            .expect("admitted while the balance is positive");
        // Balance is now -300: 301 tokens to earn at 10/s.
        assert_eq!(rate.charge("a", 1, t0), Err(31));
        rate.charge("b", 100, t0)
            .expect("another tenant has its own bucket");
        assert_eq!(rate.charge("a", 1, t0 + Duration::from_secs(20)), Err(11));
        rate.charge("a", 1, t0 + Duration::from_secs(31))
            .expect("paid back");
    }

    #[test]
    fn refunds_restore_the_balance_up_to_one_minute_and_zero_is_off() {
        let rate = TokenRate::new(60);
        let t0 = Instant::now();
        rate.charge("a", 100, t0).unwrap();
        assert!(rate.charge("a", 1, t0).is_err());
        rate.refund("a", 1000);
        rate.charge("a", 60, t0).expect("refunded, capped at 60");
        assert!(rate.charge("a", 1, t0).is_err(), "the cap held");
        let off = TokenRate::new(0);
        for _ in 0..100 {
            off.charge("a", usize::MAX, t0).unwrap();
        }
    }
}
