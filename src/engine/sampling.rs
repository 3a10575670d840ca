//! Validated sampling parameters and the next-token choice (greedy, temperature, top-k, top-p,
//! seed), with log-probabilities.
