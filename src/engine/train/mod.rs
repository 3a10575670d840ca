//! LoRA training on the frozen base: datasets ([`data`]) turned into token sequences with
//! per-token loss masks, a differentiable forward whose base projections are frozen custom ops
//! (their backward yields only the input gradient), SFT and DPO losses, AdamW with a schedule,
//! and the step loop with checkpoints. Nothing here knows HTTP or SQL; the job runner
//! (`crate::jobs`) drives it.

pub mod checkpoint;
mod composed;
pub mod data;
pub mod forward;
pub mod frozen;
pub mod hyper;
pub mod kernels;
pub mod loss;
pub mod optim;
pub mod params;
pub mod trainer;

pub use hyper::{Hyper, HyperRequest};
pub use trainer::{StepReport, Trainer};

#[cfg(test)]
mod tests;
