//! `adapterd finetune`: the same training a `/v1/finetune` job runs, offline, from a JSONL
//! file, with a progress bar; the adapter is written in PEFT format to `--out` (atomically:
//! a temporary directory renamed into place), ready to upload or to load in PEFT/vLLM/LoRAX.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{Overrides, Settings};
use crate::engine::train::data::{DatasetLimits, Method};
use crate::engine::train::hyper::{HyperLimits, HyperRequest};
use crate::engine::train::Trainer;

#[derive(Debug, clap::Args)]
pub struct FinetuneArgs {
    /// `sft` or `dpo`.
    #[arg(long, value_parser = ["sft", "dpo"])]
    pub method: String,
    /// Training data: JSONL records (the formats `/v1/finetune` accepts).
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory for adapter_config.json + adapter_model.safetensors (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Hyperparameters as JSON, e.g. '{"rank": 16, "epochs": 3}' (the API's `hyperparameters`).
    #[arg(long, default_value = "{}")]
    pub hyperparameters: String,
    #[command(flatten)]
    pub overrides: Overrides,
}

pub fn run(args: FinetuneArgs) -> anyhow::Result<()> {
    let settings = Settings::load(&args.overrides)?;
    anyhow::ensure!(
        !args.out.exists(),
        "--out {} already exists; choose a new directory",
        args.out.display()
    );
    let method = match args.method.as_str() {
        "dpo" => Method::Dpo,
        _ => Method::Sft,
    };
    let request: HyperRequest = serde_json::from_str(&args.hyperparameters)
        .context("--hyperparameters is not a valid hyperparameters object")?;
    let path = crate::app::resolve_model_path(&settings)?;
    eprintln!("loading {}", path.display());
    let device = settings
        .device_spec()?
        .resolve()
        .map_err(anyhow::Error::msg)?;
    let loaded = crate::engine::load_model_with(&path, &device, settings.kernels_for(&device)?)
        .with_context(|| format!("loading model {}", path.display()))?;
    let hyper = request
        .resolve(
            method,
            &HyperLimits {
                max_rank: settings.adapters.max_rank,
                max_seq_len: loaded.model.cfg.max_position_embeddings,
                max_steps: settings.finetune.max_steps,
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let jsonl =
        std::fs::read(&args.data).with_context(|| format!("reading {}", args.data.display()))?;
    let limits = DatasetLimits {
        max_records: settings.datasets.max_records,
        max_bytes: settings.datasets.max_file_bytes,
    };
    let examples = crate::jobs::prepare_examples(&jsonl, &hyper, &loaded.tokenizer, &limits)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.data.display()))?;
    let base_name = if settings.model.name.is_empty() {
        loaded.name.clone()
    } else {
        settings.model.name.clone()
    };
    let n = examples.len();
    let mut trainer = Trainer::new(Arc::new(loaded.model), hyper, examples)?;
    eprintln!(
        "{} {n} examples, {} steps, dataset sha256 {}",
        args.method,
        trainer.total_steps(),
        crate::jobs::dataset_sha256(&jsonl)
    );
    let bar = ProgressBar::new(trainer.total_steps() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let threads = if settings.model.threads > 0 {
        settings.model.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut last = String::new();
    while !trainer.is_done() {
        let r = pool.install(|| trainer.step())?;
        let mut msg = format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            r.loss, r.learning_rate, r.tokens_per_s
        );
        if let Some(d) = r.dpo {
            msg.push_str(&format!(
                " margin {:.3} acc {:.2}",
                d.reward_margin, d.reward_accuracy
            ));
        }
        last = format!("step {}/{}: {msg}", r.step, r.total_steps);
        bar.set_message(msg);
        bar.inc(1);
    }
    bar.finish();
    // The bar is hidden when stderr is not a terminal; the last step's numbers always show.
    eprintln!("{last}");

    let adapter = trainer.adapter()?;
    let parent = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)?;
    let tmp = parent.join(format!(".adapterd-tmp-{}", uuid::Uuid::new_v4().simple()));
    crate::engine::lora::peft::save_peft(&adapter, &base_name, &tmp)
        .map_err(|e| anyhow::anyhow!("writing the adapter: {e}"))?;
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("moving the adapter into {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
