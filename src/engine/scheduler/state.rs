//! Pure batching state: which waiting requests to admit and how many tokens each running
//! sequence contributes to the next forward step. No tensors, no threads — unit-tested directly.
//!
//! Policy (continuous batching with chunked prefill): every sequence already decoding gets one
//! token per step; sequences still reading their prompt share the rest of a per-step token
//! budget, oldest first, so a long prompt never stalls the streams already running for more
//! than one chunk.

use std::collections::VecDeque;

/// Limits of one step.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Sequences in the running set at most.
    pub max_running: usize,
    /// Tokens one forward step may process (decode tokens + prefill chunks).
    pub max_step_tokens: usize,
}

/// What the planner needs to know of a running sequence.
pub trait Schedulable {
    /// Prompt tokens not yet fed to the model.
    fn prompt_remaining(&self) -> usize;

    /// Holding its place without taking part in steps (waiting for a twin's prefill, whose
    /// cached prefix it will then reuse).
    fn is_parked(&self) -> bool {
        false
    }
}

/// The running set and the waiting line.
pub struct State<S> {
    pub limits: BatchLimits,
    pub waiting: VecDeque<S>,
    pub running: Vec<S>,
}

impl<S: Schedulable> State<S> {
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Moves waiting sequences into the running set while there is room. Returns how many.
    pub fn admit(&mut self) -> usize {
        let mut n = 0;
        while self.running.len() < self.limits.max_running {
            match self.waiting.pop_front() {
                Some(s) => {
                    self.running.push(s);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// Plans one step: `(index into running, tokens to feed)` for every sequence that takes
    /// part. Decoding sequences always take part; prefilling ones take what budget remains.
    pub fn plan(&self) -> Vec<(usize, usize)> {
        let decoding = self
            .running
            .iter()
            .filter(|s| !s.is_parked() && s.prompt_remaining() == 0)
            .count();
        let mut budget = self.limits.max_step_tokens.saturating_sub(decoding);
        let mut plan = Vec::with_capacity(self.running.len());
        for (i, s) in self.running.iter().enumerate() {
            let remaining = s.prompt_remaining();
            if s.is_parked() {
                continue;
            } else if remaining == 0 {
                plan.push((i, 1));
            } else if budget > 0 {
                let n = remaining.min(budget);
                budget -= n;
                plan.push((i, n));
            }
        }
        // With a budget smaller than the decode count, prefills would starve forever; the
        // oldest prefill always gets at least one token.
        if plan
            .iter()
            .all(|&(i, _)| self.running[i].prompt_remaining() == 0)
        {
            if let Some(i) = self
                .running
                .iter()
                .position(|s| !s.is_parked() && s.prompt_remaining() > 0)
            {
                plan.push((i, 1));
                plan.sort_unstable();
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(usize);
    impl Schedulable for Fake {
        fn prompt_remaining(&self) -> usize {
            self.0
        }
    }

    /// (prompt remaining, parked)
    struct Twin(usize, bool);
    impl Schedulable for Twin {
        fn prompt_remaining(&self) -> usize {
            self.0
        }
        fn is_parked(&self) -> bool {
            self.1
        }
    }

    #[test]
    fn parked_sequences_take_no_part_and_no_budget() {
        let mut s = State::new(BatchLimits {
            max_running: 8,
            max_step_tokens: 10,
        });
        s.running
            .extend([Twin(0, false), Twin(6, true), Twin(9, false), Twin(0, true)]);
        // One decode token; the parked prefill and decode get nothing.
        assert_eq!(s.plan(), vec![(0, 1), (2, 9)]);
        // Only parked prefills beside decodes: no starvation fallback picks them.
        let mut s = State::new(BatchLimits {
            max_running: 8,
            max_step_tokens: 1,
        });
        s.running.extend([Twin(0, false), Twin(5, true)]);
        assert_eq!(s.plan(), vec![(0, 1)]);
    }

    fn state(max_running: usize, max_step_tokens: usize) -> State<Fake> {
        State::new(BatchLimits {
            max_running,
            max_step_tokens,
        })
    }

    #[test]
    fn admission_stops_at_the_running_limit_in_arrival_order() {
        let mut s = state(2, 64);
        s.waiting.extend([Fake(3), Fake(4), Fake(5)]);
        assert_eq!(s.admit(), 2);
        assert_eq!(
            s.running.iter().map(|f| f.0).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(s.waiting.len(), 1);
    }

    #[test]
    fn decoding_sequences_get_one_token_and_prefills_share_the_rest() {
        let mut s = state(8, 10);
        s.running.extend([Fake(0), Fake(6), Fake(0), Fake(9)]);
        // 2 decode tokens leave 8: the first prefill takes 6, the second the last 2.
        assert_eq!(s.plan(), vec![(0, 1), (1, 6), (2, 1), (3, 2)]);
    }

    #[test]
    fn a_prefill_is_never_starved_by_decodes() {
        let mut s = state(8, 2);
        s.running.extend([Fake(0), Fake(0), Fake(0), Fake(7)]);
        assert_eq!(s.plan(), vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn an_idle_state_plans_nothing() {
        let s = state(4, 16);
        assert!(s.is_idle());
        assert!(s.plan().is_empty());
    }
}
