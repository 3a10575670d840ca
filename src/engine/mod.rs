//! The engine: model weights, tokenizer, sampling and the scheduler thread. Nothing here knows
//! HTTP or SQL; the API talks to it through an `EngineHandle`.

pub mod sampling;
pub mod tokenizer;
