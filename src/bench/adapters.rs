//! Adapters for the adapter scenarios: random LoRA adapters in PEFT format for a base model
//! (every projection of every layer, rank 16 by default — the heaviest common shape), uploaded
//! through the server's `POST /v1/adapters`, and the list of what was uploaded, which a later
//! run can reuse (`--prepare-adapters` then `--adapters-from`, with a server restart between,
//! is how the cold scenario gets adapters the server has never loaded: adapterd keeps an
//! uploaded adapter resident, so "unused since upload" is still warm).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::engine::lora::peft::save_peft;
use crate::engine::lora::{LayerLora, LoraAdapter, LoraPair, Module};
use crate::engine::model::load::read_gguf_header;
use crate::engine::model::ModelConfig;

/// The base model's shape, from a .gguf file or a Hugging Face directory (config.json).
pub fn model_config(model: &Path) -> Result<ModelConfig> {
    if model.is_dir() {
        let text = std::fs::read_to_string(model.join("config.json"))
            .with_context(|| format!("reading {}/config.json", model.display()))?;
        Ok(ModelConfig::from_hf_json(&text)?)
    } else {
        Ok(ModelConfig::from_gguf(&read_gguf_header(model)?.0)?)
    }
}

/// A random adapter on all seven projections of every layer, alpha = 2 × rank. B is small so
/// the adapted model stays fluent, and non-zero so its output really changes.
pub fn random_adapter(cfg: &ModelConfig, rank: usize, seed: u64) -> Result<LoraAdapter> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = |rows: usize, cols: usize, scale: f32| -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
    };
    let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let alpha = 2.0 * rank as f64;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        let mut l = LayerLora::default();
        for m in Module::ALL {
            let (inp, out) = match m {
                Module::Q => (h, q),
                Module::K | Module::V => (h, kv),
                Module::O => (q, h),
                Module::Gate | Module::Up => (h, ffn),
                Module::Down => (ffn, h),
            };
            l.modules[m.index()] = Some(LoraPair {
                a: t(rank, inp, 0.05)?,
                b: t(out, rank, 0.01)?,
                scale: alpha / rank as f64,
                int8: None,
            });
        }
        layers.push(l);
    }
    Ok(LoraAdapter {
        layers,
        rank,
        alpha,
        use_rslora: false,
        target_modules: Module::ALL.iter().map(|m| m.hf_name().to_owned()).collect(),
        size_bytes: 0,
        packed: Default::default(),
    })
}

/// Writes a random adapter's PEFT files into `dir` (created).
pub fn write_random_adapter(
    cfg: &ModelConfig,
    base_name: &str,
    rank: usize,
    seed: u64,
    dir: &Path,
) -> Result<()> {
    let adapter = random_adapter(cfg, rank, seed)?;
    save_peft(&adapter, base_name, dir)?;
    Ok(())
}

/// The adapters a run uploaded, by role; written by `--prepare-adapters`, read by
/// `--adapters-from`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterSet {
    /// Used by the one-adapter (first) and N-adapter (first N) scenarios.
    pub mix: Vec<String>,
    /// Used once each by the cold scenario.
    pub cold: Vec<String>,
    pub rank: usize,
    /// Whether the server may have loaded the cold adapters since upload (true when they were
    /// uploaded in this process's run: adapterd keeps uploads resident).
    #[serde(default)]
    pub cold_uploaded_this_run: bool,
}

impl AdapterSet {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

/// Uploads `count` fresh random adapters named `{prefix}{i}` and returns their names. The
/// files are generated under `scratch` and removed once uploaded.
#[allow(clippy::too_many_arguments)]
pub async fn upload_random(
    client: &reqwest::Client,
    url: &str,
    cfg: &ModelConfig,
    rank: usize,
    prefix: &str,
    count: usize,
    seed0: u64,
    scratch: &Path,
) -> Result<Vec<String>> {
    let mut names = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("{prefix}{i}");
        let dir = scratch.join(&name);
        let (cfg2, dir2) = (cfg.clone(), dir.clone());
        let seed = seed0.wrapping_add(i as u64);
        tokio::task::spawn_blocking(move || {
            write_random_adapter(&cfg2, "bench-base", rank, seed, &dir2)
        })
        .await
        .context("adapter generation task")??;
        let read = |f: &str| std::fs::read(dir.join(f)).with_context(|| format!("reading {f}"));
        let config = read(crate::adapters::CONFIG_FILE)?;
        let weights = read(crate::adapters::WEIGHTS_FILE)?;
        let _ = std::fs::remove_dir_all(&dir);
        let form = reqwest::multipart::Form::new()
            .text("name", name.clone())
            .part(
                crate::adapters::CONFIG_FILE,
                reqwest::multipart::Part::bytes(config).file_name(crate::adapters::CONFIG_FILE),
            )
            .part(
                crate::adapters::WEIGHTS_FILE,
                reqwest::multipart::Part::bytes(weights).file_name(crate::adapters::WEIGHTS_FILE),
            );
        let resp = client
            .post(format!("{url}/v1/adapters"))
            .multipart(form)
            .send()
            .await
            .with_context(|| format!("uploading adapter {name}"))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            bail!(
                "uploading adapter {name}: HTTP {status}: {}",
                body.chars().take(300).collect::<String>()
            );
        }
        names.push(name);
    }
    Ok(names)
}
