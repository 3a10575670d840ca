//! The adapter registry: stores uploaded (or trained) PEFT adapters as immutable versions on
//! disk and in the database, and resolves `name` / `name@version` to a resident, pinned
//! [`LoraAdapter`]. Write order is files first (temp dir, fsync, atomic rename), then the row:
//! a crash leaves at worst an unlisted directory, never a listed adapter without files.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use sqlx::SqlitePool;

use crate::engine::lora::cache::AdapterCache;
use crate::engine::lora::int8::{quantize_adapter, AdapterPrecision};
use crate::engine::lora::peft::{int8_weights, parse_peft, serving_weights, LoraError, LoraLimits};
use crate::engine::lora::LoraAdapter;
use crate::engine::model::ModelConfig;
use crate::store::adapters::{self as q, AdapterRow, ServingCopy};

mod names;
mod stored;

pub use names::{parse_ref, validate_name};
use stored::{blake3_hex, fsync_dir, remove_stray_copy_temps, sha256_hex};
pub use stored::{
    copy_file, load_cold, load_int8_copy, load_stored, load_verified, write_copy, ColdLoad, Loaded,
    Recorded,
};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The weights as the engine serves them (f16 where they fit, PEFT's names), written beside
/// the upload and verified against `serving_blake3` at every cold load; see [`load_stored`].
pub const SERVING_FILE: &str = "serving.safetensors";
/// The int8 copy a server with `adapters.precision = "int8"` serves in place (I8 A and B with
/// their per-rank scales), written beside the upload by such a server and verified against
/// `serving_int8_blake3` at its cold loads; see [`load_cold`].
pub const SERVING_INT8_FILE: &str = "serving-int8.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    Invalid(#[from] LoraError),
    #[error("adapter `{0}` not found")]
    NotFound(String),
    /// A stored version no longer loads (its files were changed or truncated on disk).
    #[error("adapter `{0}` is damaged on disk and cannot be loaded; upload it again")]
    Damaged(String),
    #[error("adapter storage: {0}")]
    Storage(String),
    /// The tenant keeps as many adapter versions or bytes as its quota allows.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The job that trained the adapter was cancelled while it was being stored, so it was not
    /// published.
    #[error("job `{0}` is no longer running; its adapter was not published")]
    JobNotRunning(String),
}

/// What one tenant may keep stored (`limits.max_adapter_versions_per_tenant`,
/// `limits.max_adapter_bytes_per_tenant`).
#[derive(Clone, Copy, Debug)]
pub struct AdapterQuota {
    pub max_versions: usize,
    pub max_bytes: u64,
}

impl Default for AdapterQuota {
    fn default() -> Self {
        Self {
            max_versions: 1_000_000,
            max_bytes: i64::MAX as u64,
        }
    }
}

impl From<sqlx::Error> for AdapterError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

impl From<std::io::Error> for AdapterError {
    fn from(e: std::io::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

/// A resolved adapter: the version row and the weights a request pins.
#[derive(Clone)]
pub struct Resolved {
    pub row: AdapterRow,
    pub adapter: Arc<LoraAdapter>,
}

pub struct AdapterRegistry {
    db: SqlitePool,
    root: PathBuf,
    base: ModelConfig,
    limits: LoraLimits,
    cache: AdapterCache,
    quota: AdapterQuota,
    /// Where resolved adapters live: the model's device.
    device: Device,
    precision: AdapterPrecision,
    /// Serialises version allocation + rename per process (SQLite serialises the rest).
    write_lock: tokio::sync::Mutex<()>,
}

/// Now in RFC 3339 UTC, seconds precision: the format of every `*_at` column.
pub fn now_rfc3339() -> String {
    // Seconds precision in UTC, e.g. 2026-11-27T04:30:00Z, without a date-time dependency.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl AdapterRegistry {
    pub fn new(
        db: SqlitePool,
        root: PathBuf,
        base: ModelConfig,
        limits: LoraLimits,
        cache_bytes: usize,
    ) -> Self {
        Self {
            db,
            root,
            base,
            limits,
            cache: AdapterCache::new(cache_bytes),
            quota: AdapterQuota::default(),
            device: Device::Cpu,
            precision: AdapterPrecision::default(),
            write_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Caps what each tenant may keep stored (default: no practical cap).
    pub fn with_quota(mut self, quota: AdapterQuota) -> Self {
        self.quota = quota;
        self
    }

    /// Resolved adapters are loaded onto `device` (the model's; the CPU by default).
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// How resolved adapters are held on the CPU (f16 by default; int8 halves their bytes).
    /// Other devices keep the loader's form.
    pub fn with_precision(mut self, precision: AdapterPrecision) -> Self {
        self.precision = precision;
        self
    }

    /// The limits uploads (and trained adapters) are validated against.
    pub fn limits(&self) -> LoraLimits {
        self.limits
    }

    fn dir(&self, tenant: &str, name: &str, version: i64) -> PathBuf {
        self.root.join(tenant).join(name).join(version.to_string())
    }

    /// Validates and stores a new version of `name`; returns its row. Nothing is written when
    /// validation fails.
    pub async fn create(
        &self,
        tenant: &str,
        name: &str,
        config: Vec<u8>,
        weights: Vec<u8>,
        source: &str,
        job_id: Option<String>,
    ) -> Result<Resolved, AdapterError> {
        validate_name("tenant", tenant)?;
        validate_name("name", name)?;
        let (base, limits) = (self.base.clone(), self.limits);
        let int8 = self.precision == AdapterPrecision::Int8 && self.device.is_cpu();
        let (adapter, config, weights, serving, int8_copy) =
            tokio::task::spawn_blocking(move || {
                let adapter = parse_peft(&config, &weights, &base, &limits, &Device::Cpu)?;
                let serving = serving_weights(&adapter)?;
                // The serving copy stays f16 (any precision can be made from it at a cold load);
                // what goes into the resident cache is the form this server serves, and an int8
                // server stores that form too, for its cold loads to read.
                let (adapter, int8_copy) = if int8 {
                    let copy = quantize_adapter(&adapter).map_err(|e| LoraError::Tensor {
                        tensor: "int8 copy".into(),
                        message: e.to_string(),
                    })?;
                    let bytes = int8_weights(&copy)?;
                    (copy, Some(bytes))
                } else {
                    (adapter, None)
                };
                Ok::<_, LoraError>((adapter, config, weights, serving, int8_copy))
            })
            .await
            .map_err(|e| AdapterError::Storage(e.to_string()))??;
        let sha = sha256_hex(&config, &weights);
        let fast_hash = blake3_hex(&config, &weights);
        let serving_hash = blake3_hex(&config, &serving);
        let int8_hash = int8_copy.as_ref().map(|b| blake3_hex(&config, b));

        let _guard = self.write_lock.lock().await;
        // Under the write lock, so concurrent uploads of one tenant cannot both pass the check.
        self.check_quota(tenant, weights.len()).await?;
        let version = q::next_version(&self.db, tenant, name).await?;
        let parent = self.root.join(tenant).join(name);
        let final_dir = self.dir(tenant, name, version);
        let tmp = parent.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let write = {
            let (tmp, final_dir, parent) = (tmp.clone(), final_dir.clone(), parent.clone());
            let (config, weights) = (config.clone(), weights.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                std::fs::create_dir_all(&tmp)?;
                let files = [
                    (CONFIG_FILE, Some(&config)),
                    (WEIGHTS_FILE, Some(&weights)),
                    (SERVING_FILE, Some(&serving)),
                    (SERVING_INT8_FILE, int8_copy.as_ref()),
                ];
                for (file, bytes) in files.into_iter().filter_map(|(f, b)| Some((f, b?))) {
                    let path = tmp.join(file);
                    std::fs::write(&path, bytes)?;
                    std::fs::File::open(&path)?.sync_all()?;
                }
                fsync_dir(&tmp)?;
                if final_dir.exists() {
                    // Left by a crash between rename and insert: that version was never listed.
                    std::fs::remove_dir_all(&final_dir)?;
                }
                std::fs::rename(&tmp, &final_dir)?;
                fsync_dir(&parent)
            })
        };
        if let Err(e) = write
            .await
            .map_err(|e| AdapterError::Storage(e.to_string()))?
        {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.into());
        }
        let row = AdapterRow {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            version,
            rank: adapter.rank as i64,
            alpha: adapter.alpha,
            target_modules: serde_json::to_string(&adapter.target_modules)
                .unwrap_or_else(|_| "[]".into()),
            size_bytes: weights.len() as i64,
            sha256: sha,
            blake3: Some(fast_hash),
            serving_blake3: Some(serving_hash),
            serving_int8_blake3: int8_hash,
            source: source.to_owned(),
            job_id,
            created_at: now_rfc3339(),
        };
        if let Err(e) = self.publish(&row).await {
            let _ = std::fs::remove_dir_all(&final_dir);
            return Err(e);
        }
        let adapter = Arc::new(adapter);
        let evicted = self.cache.insert(
            (tenant.to_owned(), name.to_owned(), version),
            adapter.clone(),
        );
        metrics::counter!(crate::metrics::ADAPTER_CACHE_EVICTIONS_TOTAL).increment(evicted as u64);
        self.record_cache_gauges();
        Ok(Resolved { row, adapter })
    }

    /// Makes a stored version visible. A version a job trained (`job_id`) is published in the
    /// same transaction that marks the job succeeded, so a cancel racing the end of training
    /// either lands first — then nothing is published and the job stays cancelled — or finds
    /// the job finished: never a cancelled job with a live adapter.
    async fn publish(&self, row: &AdapterRow) -> Result<(), AdapterError> {
        let Some(job) = &row.job_id else {
            return Ok(q::insert(&self.db, row).await?);
        };
        let mut tx = self.db.begin().await?;
        q::insert(&mut *tx, row).await?;
        let finished = crate::store::jobs::finish(
            &mut *tx,
            job,
            "succeeded",
            None,
            Some(row.version),
            &row.created_at,
        )
        .await?;
        if !finished {
            // Dropping the transaction rolls the insert back.
            return Err(AdapterError::JobNotRunning(job.clone()));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn check_quota(&self, tenant: &str, new_bytes: usize) -> Result<(), AdapterError> {
        let (versions, bytes) = q::usage(&self.db, tenant).await?;
        let (versions, bytes) = (versions.max(0) as u64, bytes.max(0) as u64);
        let quota = self.quota;
        if versions >= quota.max_versions as u64 {
            return Err(AdapterError::QuotaExceeded(format!(
                "tenant `{tenant}` already keeps {versions} adapter versions, the quota set by \
                 limits.max_adapter_versions_per_tenant; delete some first"
            )));
        }
        if bytes.saturating_add(new_bytes as u64) > quota.max_bytes {
            return Err(AdapterError::QuotaExceeded(format!(
                "storing {new_bytes} more bytes would take tenant `{tenant}` past {} bytes of \
                 adapters (now {bytes}), the quota set by limits.max_adapter_bytes_per_tenant; \
                 delete some first",
                quota.max_bytes
            )));
        }
        Ok(())
    }

    /// The row `name` or `name@version` of `tenant` refers to, without loading its weights.
    /// Another tenant's adapter is `NotFound`, exactly like a missing one.
    pub async fn find(&self, tenant: &str, reference: &str) -> Result<AdapterRow, AdapterError> {
        let (name, version) = parse_ref(reference)?;
        q::find(&self.db, tenant, &name, version)
            .await?
            .ok_or_else(|| AdapterError::NotFound(reference.to_owned()))
    }

    /// Resolves `name` (newest version) or `name@version` for `tenant` and pins its weights.
    /// Another tenant's adapter is `NotFound`, exactly like a missing one.
    pub async fn resolve(&self, tenant: &str, reference: &str) -> Result<Resolved, AdapterError> {
        let (name, version) = parse_ref(reference)?;
        let row = q::find(&self.db, tenant, &name, version)
            .await?
            .ok_or_else(|| AdapterError::NotFound(reference.to_owned()))?;
        let key = (tenant.to_owned(), name.clone(), row.version);
        if let Some(adapter) = self.cache.get(&key) {
            metrics::counter!(crate::metrics::ADAPTER_CACHE_HITS_TOTAL).increment(1);
            return Ok(Resolved { row, adapter });
        }
        metrics::counter!(crate::metrics::ADAPTER_CACHE_MISSES_TOTAL).increment(1);
        let dir = self.dir(tenant, &name, row.version);
        let (base, limits, device) = (self.base.clone(), self.limits, self.device.clone());
        let started = std::time::Instant::now();
        let stored = row.clone();
        let int8 = self.precision == AdapterPrecision::Int8 && device.is_cpu();
        let loaded = tokio::task::spawn_blocking(move || {
            let loaded = load_cold(&dir, &stored, &base, &limits, &device, int8);
            crate::engine::lora::peft::refill_warm_buffers();
            loaded
        })
        .await
        .map_err(|e| AdapterError::Storage(e.to_string()))?;
        let result = if loaded.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::metrics::ADAPTER_LOADS_TOTAL, "result" => result).increment(1);
        metrics::histogram!(crate::metrics::ADAPTER_LOAD_SECONDS)
            .record(started.elapsed().as_secs_f64());
        // A stored adapter that no longer parses is damaged on disk: a storage error for this
        // adapter, not a client error and not a crash.
        let loaded = loaded.map_err(|e| {
            tracing::error!(adapter = reference, error = %e, "stored adapter failed to load");
            AdapterError::Damaged(reference.to_owned())
        })?;
        if let Some(f16) = loaded.rewrite_serving {
            self.spawn_copy(&row, ServingCopy::F16, f16, loaded.config.clone());
        }
        if loaded.rewrite_int8 {
            self.spawn_copy(
                &row,
                ServingCopy::Int8,
                loaded.served.clone(),
                loaded.config,
            );
        }
        let adapter = loaded.served;
        let evicted = self.cache.insert(key, adapter.clone());
        metrics::counter!(crate::metrics::ADAPTER_CACHE_EVICTIONS_TOTAL).increment(evicted as u64);
        self.record_cache_gauges();
        Ok(Resolved { row, adapter })
    }

    /// Writes a version's copy of kind `copy` from the adapter a cold load just made (the f16
    /// form loaded from the upload, or the int8 copy made from it) in the background, and
    /// records its hash, so the next cold load reads the copy. Best effort: a failure is a
    /// warning, and the next cold load makes the adapter the slower way again.
    fn spawn_copy(
        &self,
        row: &AdapterRow,
        copy: ServingCopy,
        adapter: Arc<LoraAdapter>,
        config: Vec<u8>,
    ) {
        let (db, dir, row) = (
            self.db.clone(),
            self.dir(&row.tenant, &row.name, row.version),
            row.clone(),
        );
        tokio::spawn(async move {
            let written =
                tokio::task::spawn_blocking(move || write_copy(&dir, copy, &adapter, &config))
                    .await
                    .map_err(|e| AdapterError::Storage(e.to_string()))
                    .and_then(|r| r);
            let recorded = match written {
                Ok(hash) => {
                    q::set_copy_blake3(&db, copy, &row.tenant, &row.name, row.version, &hash)
                        .await
                        .map_err(AdapterError::from)
                }
                Err(e) => Err(e),
            };
            if let Err(e) = recorded {
                tracing::warn!(
                    tenant = row.tenant,
                    name = row.name,
                    version = row.version,
                    file = copy_file(copy),
                    error = %e,
                    "could not write the adapter's copy; its cold loads take the slower way"
                );
            }
        });
    }

    /// Start-up check: removes version directories no live row points at (a crash between
    /// rename and insert, or a delete interrupted before its files went), temp dirs of
    /// interrupted uploads and temp files of interrupted serving-copy writes. Returns how many
    /// were removed. Only names that pass
    /// [`validate_name`] are looked at; anything else in the store is left alone.
    pub async fn reconcile(&self) -> Result<usize, AdapterError> {
        let mut removed = 0;
        let Ok(tenants) = std::fs::read_dir(&self.root) else {
            return Ok(0);
        };
        for t in tenants.flatten() {
            let tenant = t.file_name().to_string_lossy().into_owned();
            if validate_name("tenant", &tenant).is_err() || !t.path().is_dir() {
                continue;
            }
            for n in std::fs::read_dir(t.path())?.flatten() {
                let name = n.file_name().to_string_lossy().into_owned();
                if validate_name("name", &name).is_err() || !n.path().is_dir() {
                    continue;
                }
                let live: Vec<i64> = q::versions(&self.db, &tenant, &name)
                    .await?
                    .iter()
                    .map(|r| r.version)
                    .collect();
                for v in std::fs::read_dir(n.path())?.flatten() {
                    let entry = v.file_name().to_string_lossy().into_owned();
                    let orphan = if entry.starts_with(".tmp-") {
                        true
                    } else {
                        match entry.parse::<i64>() {
                            Ok(version) => !live.contains(&version),
                            Err(_) => false,
                        }
                    };
                    if orphan && std::fs::remove_dir_all(v.path()).is_ok() {
                        tracing::warn!(
                            tenant,
                            name,
                            entry,
                            "removed an adapter directory no live version points at"
                        );
                        removed += 1;
                    } else if !orphan && v.path().is_dir() {
                        removed += remove_stray_copy_temps(&v.path());
                    }
                }
            }
        }
        Ok(removed)
    }

    pub async fn list(&self, tenant: &str) -> Result<Vec<AdapterRow>, AdapterError> {
        Ok(q::list_latest(&self.db, tenant).await?)
    }

    pub async fn versions(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Vec<AdapterRow>, AdapterError> {
        validate_name("name", name)?;
        let v = q::versions(&self.db, tenant, name).await?;
        if v.is_empty() {
            return Err(AdapterError::NotFound(name.to_owned()));
        }
        Ok(v)
    }

    /// Deletes every version of `name`. Requests already running keep their pinned weights.
    pub async fn delete(&self, tenant: &str, name: &str) -> Result<(), AdapterError> {
        validate_name("name", name)?;
        let _guard = self.write_lock.lock().await;
        if q::delete(&self.db, tenant, name, &now_rfc3339()).await? == 0 {
            return Err(AdapterError::NotFound(name.to_owned()));
        }
        self.cache.remove_all(tenant, name);
        self.record_cache_gauges();
        // The rows are gone from every listing first; the files are then removed. A crash in
        // between leaves only unlisted files.
        let dir = self.root.join(tenant).join(name);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        Ok(())
    }

    fn record_cache_gauges(&self) {
        let (n, bytes) = self.cache.usage();
        metrics::gauge!(crate::metrics::ADAPTERS_RESIDENT).set(n as f64);
        metrics::gauge!(crate::metrics::ADAPTER_CACHE_BYTES).set(bytes as f64);
    }
}

#[cfg(test)]
mod tests;
