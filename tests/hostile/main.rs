//! Hostile input, as property tests (proptest) plus a committed corpus of nasty inputs
//! (tests/fixtures/hostile/) that every run replays: the PEFT/safetensors parser, the dataset
//! parser, every JSON endpoint and the multipart upload through the real router, and names
//! meant to escape the store. Nothing may panic, allocate without bound, answer 5xx, drop a
//! connection or create a path outside the store. Case counts are bounded so the whole set
//! runs in seconds; `PROPTEST_CASES` raises them for a longer soak.

mod alloc;
mod api;
mod corpus;
mod dataset;
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
mod names;
mod peft;
mod strategies;
