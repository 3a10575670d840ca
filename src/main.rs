//! The `adapterd` binary: parses the command line, sets up logging, and runs a subcommand
//! (`serve`, `keys`, `finetune`, `fetch-model`, `chinchilla`, `bench`). Everything else lives
//! in the library.

use clap::{Parser, Subcommand};

use adapterd::app::Application;
use adapterd::config::{Overrides, Settings};

#[derive(Parser)]
#[command(
    name = "adapterd",
    version,
    about = "Serve one base model to many tenants with per-request LoRA adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (loads the model first; fetches the default model if needed).
    Serve(Overrides),
    /// Manage API keys (create, list, revoke) in the configured database; loads no model.
    Keys(adapterd::keys::KeysArgs),
    /// Download and verify the default model into the cache, then print its path.
    FetchModel {
        /// Cache directory (default: $XDG_CACHE_HOME/adapterd/models or ~/.cache/adapterd/models).
        #[arg(long, env = "ADAPTERD_MODEL_CACHE")]
        model_cache: Option<std::path::PathBuf>,
    },
    /// Train a LoRA adapter (SFT or DPO) from a JSONL file offline, with a progress bar; writes
    /// PEFT files to --out.
    Finetune(adapterd::finetune_cli::FinetuneArgs),
    /// Chinchilla-style compute planning: model size, tokens and loss for a FLOP budget.
    Chinchilla(adapterd::scaling::ChinchillaArgs),
    /// Benchmark an OpenAI-compatible server (adapterd, llama-server) over loopback; see
    /// docs/benchmarking.md.
    Bench(adapterd::bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(o) => {
            let settings = Settings::load(&o)?;
            set_threads(settings.model.threads);
            let rt = tokio::runtime::Runtime::new()?;
            let served = rt.block_on(async move {
                let app = Application::build(settings).await?;
                app.run(shutdown_signal()).await
            });
            // A training step still running past the grace period is abandoned (the job resumes
            // from its last checkpoint); don't let it hold the exit.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            served
        }
        Command::Keys(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            print!("{}", rt.block_on(adapterd::keys::run_cli(&args))?);
            Ok(())
        }
        Command::FetchModel { model_cache } => {
            let path = adapterd::model_fetch::ensure_default_model(model_cache.as_deref())?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Finetune(args) => {
            set_threads(args.overrides.threads.unwrap_or(0));
            adapterd::finetune_cli::run(args)
        }
        Command::Chinchilla(args) => {
            print!("{}", adapterd::scaling::run_cli(&args)?);
            Ok(())
        }
        Command::Bench(args) => adapterd::bench::run_cli(args),
    }
}

/// Thread budgets must be set before the first tensor op. Parallel work runs on our own rayon
/// pools (the engine's and the trainer's), whose sizes come from `RAYON_NUM_THREADS`/settings.
/// candle's separate spin-waiting pool for element-wise ops is kept at one thread (the caller):
/// with serving and training in one process its spinning workers stole the cores doing real
/// work — measured, a training step spent 38% of its time spinning in it.
fn set_threads(threads: usize) {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}
