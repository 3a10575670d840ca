//! Settings: config/default.toml (compiled in), an optional `--config` file naming only the keys
//! it changes, then `ADAPTERD_*` environment variables and command-line flags. Validated once at
//! start so a bad value fails before anything binds or loads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The defaults, every key commented, shipped in the repository and in the binary.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub model: ModelSettings,
    pub engine: EngineSettings,
    pub adapters: AdapterSettings,
    pub storage: StorageSettings,
    pub datasets: DatasetSettings,
    pub finetune: FinetuneSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSettings {
    pub max_file_bytes: usize,
    pub max_records: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Require `Authorization: Bearer <key>` on /v1 routes; off means every caller is `default`.
    pub enabled: bool,
    /// Allow a non-loopback bind with auth off.
    pub insecure: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Generation requests one tenant may have in progress (streams included) at once.
    pub max_concurrent_per_tenant: usize,
    /// Tokens (prompt + max_new_tokens, the unused part refunded) one tenant may spend per
    /// minute; 0 turns the limit off.
    pub tokens_per_minute: u64,
    /// Longest prompt in tokens; 0 means the model's context length.
    pub max_prompt_tokens: usize,
    /// Generation requests of one tenant that may wait in the shared engine queue at once.
    pub max_queued_per_tenant: usize,
    /// Adapter versions one tenant may keep stored (every version counts until deleted).
    pub max_adapter_versions_per_tenant: usize,
    /// Bytes of adapter weights one tenant may keep stored.
    pub max_adapter_bytes_per_tenant: u64,
    /// Dataset files one tenant may keep in /v1/files.
    pub max_files_per_tenant: usize,
    /// Bytes of dataset files one tenant may keep in /v1/files.
    pub max_file_bytes_per_tenant: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSettings {
    pub max_rank: usize,
    pub max_upload_bytes: usize,
    pub cache_bytes: usize,
    /// How resident adapters hold A and B on the CPU: "f16" (default) or "int8".
    pub precision: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: String,
    pub max_body_bytes: usize,
    /// Longest time from a request's headers to its response's headers (body upload and a
    /// non-streamed generation included); 408 after it.
    pub request_timeout_seconds: u64,
    /// Longest time a streamed response may run; then it is ended with an error event.
    pub stream_timeout_seconds: u64,
    /// After SIGTERM/Ctrl-C: how long in-flight requests may take to finish before they are cut.
    pub shutdown_grace_seconds: u64,
    /// Longest time a connection may take to send a request's headers, and so also the longest
    /// a keep-alive connection may sit idle; the connection is closed after it.
    pub header_timeout_seconds: u64,
    /// Serve `/metrics` on this address instead of the API port; empty: on the API port.
    pub metrics_bind: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub path: String,
    pub name: String,
    pub cache_dir: String,
    pub threads: usize,
    /// How quantized matmuls round activations: "int16" (default), "int8" or "f32".
    pub activations: String,
    /// Where the model runs: "cpu" (default), "cuda", "cuda:N" or "auto".
    pub device: String,
    /// "auto" (adapterd's CPU kernels on the CPU, candle's ops on a GPU) or "portable"
    /// (candle's ops everywhere: what a GPU runs, to check the CPU kernels against).
    pub kernels: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    pub max_running: usize,
    pub max_waiting: usize,
    pub max_step_tokens: usize,
    /// Bytes of prompt-prefix keys and values kept for reuse (0: off).
    pub prefix_cache_bytes: usize,
    pub default_max_new_tokens: usize,
    pub max_new_tokens_limit: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub adapters_dir: String,
    pub database_url: String,
    /// Working files of running fine-tuning jobs (checkpoints).
    pub jobs_dir: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSettings {
    /// Run queued jobs in the background (tests turn it off and call `run_pending_jobs`).
    pub autostart: bool,
    /// Threads training may use; the rest of the machine stays with serving.
    pub threads: usize,
    /// Scheduling niceness of the training threads (0–19; higher yields more to serving).
    pub nice: i32,
    /// Queued plus running jobs one tenant may have.
    pub max_active_per_tenant: usize,
    /// Largest `max_steps` (and computed step count) a job may have.
    pub max_steps: usize,
}

/// Overrides from flags or environment; `None` keeps the file's value.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// Settings file (TOML) whose keys override config/default.toml.
    #[arg(long, env = "ADAPTERD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, env = "ADAPTERD_BIND")]
    pub bind: Option<String>,
    /// A .gguf file or a Hugging Face model directory (default: SmolLM2-135M-Instruct, fetched once).
    #[arg(long, env = "ADAPTERD_MODEL")]
    pub model: Option<String>,
    /// Where the default model is cached.
    #[arg(long, env = "ADAPTERD_MODEL_CACHE")]
    pub model_cache: Option<String>,
    /// CPU threads for tensor work (0: one per core).
    #[arg(long, env = "ADAPTERD_THREADS")]
    pub threads: Option<usize>,
    /// Where the model runs: cpu, cuda, cuda:N or auto (a GPU needs a `--features cuda` build).
    #[arg(long, env = "ADAPTERD_DEVICE")]
    pub device: Option<String>,
    /// Adapter store directory.
    #[arg(long, env = "ADAPTERD_ADAPTERS_DIR")]
    pub adapters_dir: Option<String>,
    /// SQLite URL, e.g. sqlite://data/adapterd.db.
    #[arg(long, env = "ADAPTERD_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Require an API key (`Authorization: Bearer <key>`) on every /v1 route.
    #[arg(long, env = "ADAPTERD_AUTH")]
    pub auth: bool,
    /// Allow listening on a non-loopback address with auth off (every caller is `default`).
    #[arg(long, env = "ADAPTERD_INSECURE")]
    pub insecure: bool,
    /// Serve /metrics on this address (e.g. 127.0.0.1:9090) instead of the API port.
    #[arg(long, env = "ADAPTERD_METRICS_BIND")]
    pub metrics_bind: Option<String>,
    /// How resident adapters hold their weights on the CPU: f16 (default) or int8 (half the
    /// memory and the bytes a many-adapter decode step reads, slightly less exact).
    #[arg(long, env = "ADAPTERD_ADAPTER_PRECISION")]
    pub adapter_precision: Option<String>,
}

impl Settings {
    /// The compiled-in defaults alone.
    pub fn defaults() -> anyhow::Result<Self> {
        toml::from_str(DEFAULT_TOML).context("config/default.toml")
    }

    /// Defaults, then the `--config` file, then flags/environment; validated.
    pub fn load(o: &Overrides) -> anyhow::Result<Self> {
        let mut base: toml::Value = toml::from_str(DEFAULT_TOML).context("config/default.toml")?;
        if let Some(path) = &o.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let user: toml::Value =
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            merge(&mut base, user);
        }
        let mut s: Settings = base
            .try_into()
            .with_context(|| "invalid settings (unknown key or wrong type)".to_string())?;
        if let Some(v) = &o.bind {
            s.server.bind = v.clone();
        }
        if let Some(v) = &o.metrics_bind {
            s.server.metrics_bind = v.clone();
        }
        if let Some(v) = &o.model {
            s.model.path = v.clone();
        }
        if let Some(v) = &o.model_cache {
            s.model.cache_dir = v.clone();
        }
        if let Some(v) = o.threads {
            s.model.threads = v;
        }
        if let Some(v) = &o.device {
            s.model.device = v.clone();
        }
        if let Some(v) = &o.adapters_dir {
            s.storage.adapters_dir = v.clone();
        }
        if let Some(v) = &o.database_url {
            s.storage.database_url = v.clone();
        }
        if let Some(v) = &o.adapter_precision {
            s.adapters.precision = v.clone();
        }
        s.auth.enabled |= o.auth;
        s.auth.insecure |= o.insecure;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.bind_addr()?;
        self.device_spec()?;
        self.kernels_for(&candle_core::Device::Cpu)?;
        let e = &self.engine;
        if e.max_running == 0 || e.max_waiting == 0 || e.max_step_tokens == 0 {
            bail!(
                "engine.max_running, engine.max_waiting and engine.max_step_tokens must be at least 1"
            );
        }
        if e.default_max_new_tokens == 0 || e.default_max_new_tokens > e.max_new_tokens_limit {
            bail!(
                "engine.default_max_new_tokens must be between 1 and engine.max_new_tokens_limit"
            );
        }
        let f = &self.finetune;
        if !(0..=19).contains(&f.nice) {
            bail!("finetune.nice must be between 0 and 19");
        }
        if f.threads == 0 || f.max_active_per_tenant == 0 || f.max_steps == 0 {
            bail!("finetune.threads, finetune.max_active_per_tenant and finetune.max_steps must be at least 1");
        }
        if self.adapters.max_rank == 0 || self.adapters.max_upload_bytes < 1024 {
            bail!(
                "adapters.max_rank must be at least 1 and adapters.max_upload_bytes at least 1024"
            );
        }
        if self.datasets.max_file_bytes == 0 || self.datasets.max_records == 0 {
            bail!("datasets.max_file_bytes and datasets.max_records must be at least 1");
        }
        if self.server.max_body_bytes < 1024 {
            bail!("server.max_body_bytes must be at least 1024");
        }
        if !self.storage.database_url.starts_with("sqlite:") {
            bail!("storage.database_url must be a sqlite: URL");
        }
        let l = &self.limits;
        for (name, value) in [
            (
                "limits.max_concurrent_per_tenant",
                l.max_concurrent_per_tenant,
            ),
            ("limits.max_queued_per_tenant", l.max_queued_per_tenant),
            (
                "limits.max_adapter_versions_per_tenant",
                l.max_adapter_versions_per_tenant,
            ),
            ("limits.max_files_per_tenant", l.max_files_per_tenant),
        ] {
            if !(1..=1_000_000).contains(&value) {
                bail!("{name} must be between 1 and 1000000");
            }
        }
        for (name, value) in [
            (
                "limits.max_adapter_bytes_per_tenant",
                l.max_adapter_bytes_per_tenant,
            ),
            (
                "limits.max_file_bytes_per_tenant",
                l.max_file_bytes_per_tenant,
            ),
        ] {
            if value == 0 || value > i64::MAX as u64 {
                bail!("{name} must be at least 1 (bytes)");
            }
        }
        let sv = &self.server;
        for (name, secs) in [
            ("server.request_timeout_seconds", sv.request_timeout_seconds),
            ("server.stream_timeout_seconds", sv.stream_timeout_seconds),
            ("server.header_timeout_seconds", sv.header_timeout_seconds),
        ] {
            if !(1..=86_400).contains(&secs) {
                bail!("{name} must be between 1 and 86400");
            }
        }
        self.metrics_addr()?;
        self.activation_precision()?;
        self.adapter_precision()?;
        if sv.shutdown_grace_seconds > 3600 {
            bail!("server.shutdown_grace_seconds must be at most 3600");
        }
        Ok(())
    }

    /// Refuses to serve every caller as tenant `default` on an address other machines can
    /// reach, unless the operator said so (`--insecure` / `auth.insecure`). Checked by
    /// `Application::build`, not by `validate`, so `adapterd keys` works with any bind.
    pub fn check_exposure(&self) -> anyhow::Result<()> {
        let addr = self.bind_addr()?;
        if !addr.ip().is_loopback() && !self.auth.enabled && !self.auth.insecure {
            bail!(
                "refusing to listen on {addr} with authentication off: anyone who can reach it \
                 would act as tenant `default`. Turn auth on (--auth or auth.enabled = true, \
                 keys from `adapterd keys create`), bind a loopback address, or pass --insecure \
                 (auth.insecure = true) to accept the risk"
            );
        }
        Ok(())
    }

    pub fn bind_addr(&self) -> anyhow::Result<SocketAddr> {
        self.server.bind.parse().with_context(|| {
            format!(
                "server.bind `{}` is not an address like 127.0.0.1:8080",
                self.server.bind
            )
        })
    }

    /// `model.activations` as the kernel's setting.
    pub fn activation_precision(
        &self,
    ) -> anyhow::Result<crate::engine::model::qmatmul::ActivationPrecision> {
        self.model
            .activations
            .parse()
            .map_err(|e: String| anyhow::anyhow!("model.activations: {e}"))
    }

    /// `adapters.precision` as the registry's setting.
    pub fn adapter_precision(&self) -> anyhow::Result<crate::engine::lora::int8::AdapterPrecision> {
        self.adapters
            .precision
            .parse()
            .map_err(|e: String| anyhow::anyhow!("adapters.precision: {e}"))
    }

    /// `model.device` parsed (resolving it to a device happens at start, in `app`).
    pub fn device_spec(&self) -> anyhow::Result<crate::engine::device::DeviceSpec> {
        self.model
            .device
            .parse()
            .map_err(|e: String| anyhow::anyhow!("model.device: {e}"))
    }

    /// The forward's kernels for a model on `device` (`model.kernels`).
    pub fn kernels_for(
        &self,
        device: &candle_core::Device,
    ) -> anyhow::Result<crate::engine::model::Kernels> {
        use crate::engine::model::Kernels;
        match self.model.kernels.trim() {
            "auto" => Ok(Kernels::for_device(device)),
            "portable" => Ok(Kernels::Portable),
            other => bail!("model.kernels: `{other}` is not \"auto\" or \"portable\""),
        }
    }

    /// Where `/metrics` gets its own listener, if `server.metrics_bind` is set.
    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        let bind = self.server.metrics_bind.trim();
        if bind.is_empty() {
            return Ok(None);
        }
        bind.parse().map(Some).with_context(|| {
            format!("server.metrics_bind `{bind}` is not an address like 127.0.0.1:9090")
        })
    }

    /// The model cache directory, if one is configured.
    pub fn model_cache_dir(&self) -> Option<&Path> {
        (!self.model.cache_dir.is_empty()).then(|| Path::new(&self.model.cache_dir))
    }
}

/// Recursively overlays `over` on `base` (tables merge, other values replace).
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let s = Settings::defaults().unwrap();
        s.validate().unwrap();
        assert_eq!(s.server.bind, "127.0.0.1:8080");
    }

    #[test]
    fn a_config_file_overrides_only_the_keys_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[engine]\nmax_running = 3\n").unwrap();
        let o = Overrides {
            config: Some(path),
            bind: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let s = Settings::load(&o).unwrap();
        assert_eq!(s.engine.max_running, 3);
        assert_eq!(s.engine.max_waiting, 64);
        assert_eq!(s.server.bind, "127.0.0.1:0");
    }

    #[test]
    fn adapter_precision_is_f16_unless_set_and_names_its_key_when_wrong() {
        let s = Settings::load(&Overrides::default()).unwrap();
        assert_eq!(
            s.adapter_precision().unwrap(),
            crate::engine::lora::int8::AdapterPrecision::F16
        );
        let o = Overrides {
            adapter_precision: Some("int8".into()),
            ..Default::default()
        };
        let s = Settings::load(&o).unwrap();
        assert_eq!(
            s.adapter_precision().unwrap(),
            crate::engine::lora::int8::AdapterPrecision::Int8
        );
        let o = Overrides {
            adapter_precision: Some("int4".into()),
            ..Default::default()
        };
        let err = Settings::load(&o).unwrap_err().to_string();
        assert!(
            err.contains("adapters.precision") && err.contains("int4"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[engine]\nmax_runing = 3\n").unwrap();
        let o = Overrides {
            config: Some(path),
            ..Default::default()
        };
        assert!(Settings::load(&o).is_err());
        let o = Overrides {
            bind: Some("not an address".into()),
            ..Default::default()
        };
        let err = Settings::load(&o).unwrap_err().to_string();
        assert!(err.contains("server.bind"), "{err}");
    }

    #[test]
    fn the_device_flag_overrides_and_a_bad_device_is_refused_by_name() {
        let o = Overrides {
            device: Some("cuda:1".into()),
            ..Default::default()
        };
        let s = Settings::load(&o).unwrap();
        assert_eq!(
            s.device_spec().unwrap(),
            crate::engine::device::DeviceSpec::Cuda(1)
        );
        assert_eq!(
            Settings::defaults().unwrap().device_spec().unwrap(),
            crate::engine::device::DeviceSpec::Cpu
        );
        let o = Overrides {
            device: Some("tpu:0".into()),
            ..Default::default()
        };
        let err = format!("{:#}", Settings::load(&o).unwrap_err());
        assert!(
            err.contains("model.device") && err.contains("tpu:0"),
            "{err}"
        );
    }

    #[test]
    fn kernels_follow_the_device_unless_portable_is_asked() {
        use crate::engine::model::Kernels;
        let mut s = Settings::defaults().unwrap();
        let cpu = candle_core::Device::Cpu;
        assert_eq!(s.kernels_for(&cpu).unwrap(), Kernels::Native);
        s.model.kernels = "portable".into();
        assert_eq!(s.kernels_for(&cpu).unwrap(), Kernels::Portable);
        s.model.kernels = "fast".into();
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("model.kernels") && err.contains("fast"),
            "{err}"
        );
    }

    #[test]
    fn flags_turn_auth_on_and_limits_are_validated() {
        let o = Overrides {
            auth: true,
            ..Default::default()
        };
        let s = Settings::load(&o).unwrap();
        assert!(s.auth.enabled && !s.auth.insecure);
        assert_eq!(s.limits.max_concurrent_per_tenant, 32);
        let mut s = Settings::defaults().unwrap();
        s.limits.max_concurrent_per_tenant = 0;
        assert!(s.validate().is_err());
        let mut s = Settings::defaults().unwrap();
        assert_eq!(s.server.shutdown_grace_seconds, 10);
        assert!(s.limits.tokens_per_minute > 0, "a generous default, on");
        s.server.request_timeout_seconds = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("server.request_timeout_seconds"), "{err}");
        // A zero-length queue would refuse every request with 429.
        let mut s = Settings::defaults().unwrap();
        s.engine.max_waiting = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("engine.max_waiting"), "{err}");
    }

    #[test]
    fn a_public_bind_needs_auth_or_insecure() {
        let mut s = Settings::defaults().unwrap();
        s.check_exposure().unwrap();
        for bind in ["0.0.0.0:8080", "[::]:8080", "192.0.2.1:80"] {
            s.server.bind = bind.into();
            let err = s.check_exposure().unwrap_err().to_string();
            assert!(
                err.contains("--insecure") && err.contains("--auth"),
                "{err}"
            );
        }
        s.auth.insecure = true;
        s.check_exposure().unwrap();
        s.auth.insecure = false;
        s.auth.enabled = true;
        s.check_exposure().unwrap();
        s.server.bind = "[::1]:8080".into();
        s.auth.enabled = false;
        s.check_exposure().unwrap();
    }
}
