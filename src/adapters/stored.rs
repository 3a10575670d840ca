//! A stored version's files: the hashes recorded at upload, the verified cold load (read once,
//! hash and parse the same bytes), and the copies written beside the upload: the f16 serving
//! copy, and the int8 copy a server with `adapters.precision = "int8"` serves.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use sha2::{Digest, Sha256};

use super::{AdapterError, CONFIG_FILE, SERVING_FILE, SERVING_INT8_FILE, WEIGHTS_FILE};
use crate::engine::lora::int8::quantize_adapter;
use crate::engine::lora::peft::{
    int8_weights, parse_int8_file, parse_peft_file, serving_weights, Int8File, LoraLimits,
    WeightsFile,
};
use crate::engine::lora::LoraAdapter;
use crate::engine::model::ModelConfig;
use crate::store::adapters::{AdapterRow, ServingCopy};

/// The recorded identity of an adapter version: sha256 over its config bytes, then its weights.
pub(super) fn sha256_hex(config: &[u8], weights: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(config);
    h.update(weights);
    hex::encode(h.finalize())
}

/// The integrity hash checked at every load: BLAKE3 over the same bytes as [`sha256_hex`].
pub(super) fn blake3_hex(config: &[u8], weights: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(config);
    h.update(weights);
    h.finalize().to_hex().to_string()
}

/// The hash recorded for a stored version, which its files must still have.
#[derive(Clone, Debug)]
pub enum Recorded {
    /// Hex BLAKE3 over config then weights (every row since BLAKE3 was added).
    Blake3(String),
    /// Hex sha256 over the same bytes, for rows from before.
    Sha256(String),
}

/// Reads a stored version's config and the weights file `weights_file` from `dir`, checks
/// they hash to `recorded`, and parses them: the whole cold load of an adapter. Returns the
/// adapter and the config bytes it was parsed from.
///
/// The files must be the bytes that were validated (and, for [`SERVING_FILE`], written) at
/// upload: a substitute written into the store behind the service's back (valid or not) is
/// refused. Both checks run on the one copy read into memory (not a memory map, which a writer
/// could change between hash and parse), so the bytes parsed are the bytes hashed; an all-f16
/// file (the serving copy) is then served from that same memory ([`WeightsFile`]). Hash and
/// parse run side by side on the rayon pool, and BLAKE3 splits itself over whatever threads
/// the parse leaves free (it is the longer of the two: ~4.5 ms for 20 MB on one core).
pub fn load_verified(
    dir: &Path,
    weights_file: &str,
    recorded: &Recorded,
    base: &ModelConfig,
    limits: &LoraLimits,
    device: &Device,
) -> Result<(LoraAdapter, Vec<u8>), AdapterError> {
    let started = std::time::Instant::now();
    let config = std::fs::read(dir.join(CONFIG_FILE))?;
    let weights = WeightsFile::read(
        &dir.join(weights_file),
        limits.max_bytes,
        weights_file == SERVING_FILE,
    )?;
    let read = started.elapsed();
    let (found, parsed) = rayon::join(
        || weights.with_bytes(|bytes| recorded.hash(&config, bytes)),
        || parse_peft_file(&config, &weights, base, limits, device),
    );
    log_load(weights_file, weights.len(), started, read);
    recorded.check(weights_file, &found)?;
    Ok((parsed?, config))
}

impl Recorded {
    /// The hash of `config` then `bytes` of this record's kind. BLAKE3 splits itself over
    /// whatever threads the parse beside it leaves free.
    fn hash(&self, config: &[u8], bytes: &[u8]) -> String {
        match self {
            Recorded::Blake3(_) => {
                let mut h = blake3::Hasher::new();
                h.update(config);
                h.update_rayon(bytes);
                h.finalize().to_hex().to_string()
            }
            Recorded::Sha256(_) => sha256_hex(config, bytes),
        }
    }

    fn check(&self, file: &str, found: &str) -> Result<(), AdapterError> {
        let (Recorded::Blake3(want) | Recorded::Sha256(want)) = self;
        if found != want {
            return Err(AdapterError::Storage(format!(
                "{file} and {CONFIG_FILE} hash to {found}, not the recorded {want}"
            )));
        }
        Ok(())
    }
}

fn log_load(file: &str, bytes: usize, started: std::time::Instant, read: std::time::Duration) {
    tracing::debug!(
        file,
        bytes,
        read_ms = read.as_secs_f64() * 1e3,
        verify_and_parse_ms = (started.elapsed() - read).as_secs_f64() * 1e3,
        "adapter files read, hashed and parsed"
    );
}

/// Reads a stored version's config and int8 copy from `dir`, checks they hash to `blake3`,
/// and parses them (A and B served from the memory read): the cold load of a server with
/// `adapters.precision = "int8"`, on the same terms as [`load_verified`].
pub fn load_int8_copy(
    dir: &Path,
    blake3: &str,
    base: &ModelConfig,
    limits: &LoraLimits,
) -> Result<(LoraAdapter, Vec<u8>), AdapterError> {
    let started = std::time::Instant::now();
    let config = std::fs::read(dir.join(CONFIG_FILE))?;
    let file = Int8File::read(&dir.join(SERVING_INT8_FILE), limits.max_bytes)?;
    let read = started.elapsed();
    let recorded = Recorded::Blake3(blake3.to_owned());
    let (found, parsed) = rayon::join(
        || file.with_bytes(|bytes| recorded.hash(&config, bytes)),
        || parse_int8_file(&config, &file, base, limits),
    );
    log_load(SERVING_INT8_FILE, file.len(), started, read);
    recorded.check(SERVING_INT8_FILE, &found)?;
    Ok((parsed?, config))
}

/// What a cold load read: the adapter, the verified config bytes, and whether it came from the
/// serving copy.
pub struct Loaded {
    pub adapter: LoraAdapter,
    pub config: Vec<u8>,
    pub from_serving_copy: bool,
}

/// The cold load of a stored version: its serving copy when the row records one, else (or
/// when that copy is missing or fails its check) the uploaded files. The uploaded files stay
/// the source of truth, so a damaged copy costs one slower load and a warning, never the
/// adapter.
pub fn load_stored(
    dir: &Path,
    row: &AdapterRow,
    base: &ModelConfig,
    limits: &LoraLimits,
    device: &Device,
) -> Result<Loaded, AdapterError> {
    if let Some(hash) = &row.serving_blake3 {
        let recorded = Recorded::Blake3(hash.clone());
        match load_verified(dir, SERVING_FILE, &recorded, base, limits, device) {
            Ok((adapter, config)) => {
                return Ok(Loaded {
                    adapter,
                    config,
                    from_serving_copy: true,
                })
            }
            Err(e) => tracing::warn!(
                tenant = row.tenant,
                name = row.name,
                version = row.version,
                error = %e,
                "the adapter's serving copy is unusable; loading the uploaded files"
            ),
        }
    }
    let recorded = match &row.blake3 {
        Some(b) => Recorded::Blake3(b.clone()),
        None => Recorded::Sha256(row.sha256.clone()),
    };
    let (adapter, config) = load_verified(dir, WEIGHTS_FILE, &recorded, base, limits, device)?;
    Ok(Loaded {
        adapter,
        config,
        from_serving_copy: false,
    })
}

/// What a cold load made: the adapter as served, the verified config bytes, and the copies it
/// found missing or unusable, which the caller has written in the background.
pub struct ColdLoad {
    pub served: Arc<LoraAdapter>,
    pub config: Vec<u8>,
    /// The f16 form, loaded from the upload because the serving copy was missing or damaged.
    pub rewrite_serving: Option<Arc<LoraAdapter>>,
    /// Whether `served` is an int8 copy made here that must be stored as one.
    pub rewrite_int8: bool,
}

/// The cold load of a stored version in the form this server serves: with `int8`, the stored
/// int8 copy when the row records one, else (or when that copy is unusable) the int8 copy
/// made from the f16 form [`load_stored`] gives; without, [`load_stored`]'s adapter.
pub fn load_cold(
    dir: &Path,
    row: &AdapterRow,
    base: &ModelConfig,
    limits: &LoraLimits,
    device: &Device,
    int8: bool,
) -> Result<ColdLoad, AdapterError> {
    if let Some(hash) = row.serving_int8_blake3.as_ref().filter(|_| int8) {
        match load_int8_copy(dir, hash, base, limits) {
            Ok((adapter, config)) => {
                return Ok(ColdLoad {
                    served: Arc::new(adapter),
                    config,
                    rewrite_serving: None,
                    rewrite_int8: false,
                })
            }
            Err(e) => tracing::warn!(
                tenant = row.tenant,
                name = row.name,
                version = row.version,
                error = %e,
                "the adapter's int8 copy is unusable; making one from its f16 form"
            ),
        }
    }
    let loaded = load_stored(dir, row, base, limits, device)?;
    let f16 = Arc::new(loaded.adapter);
    let rewrite_serving = (!loaded.from_serving_copy).then(|| f16.clone());
    let served = if int8 {
        let started = std::time::Instant::now();
        let copy =
            quantize_adapter(&f16).map_err(|e| AdapterError::Storage(format!("int8 copy: {e}")))?;
        tracing::debug!(
            ms = started.elapsed().as_secs_f64() * 1e3,
            "adapter's int8 copy made"
        );
        Arc::new(copy)
    } else {
        f16
    };
    Ok(ColdLoad {
        served,
        config: loaded.config,
        rewrite_serving,
        rewrite_int8: int8,
    })
}

/// The file a copy is stored in.
pub fn copy_file(copy: ServingCopy) -> &'static str {
    match copy {
        ServingCopy::F16 => SERVING_FILE,
        ServingCopy::Int8 => SERVING_INT8_FILE,
    }
}

/// The bytes of `adapter`'s copy of kind `copy`: `adapter` is the f16 form for
/// [`ServingCopy::F16`], the int8 copy for [`ServingCopy::Int8`].
fn copy_bytes(copy: ServingCopy, adapter: &LoraAdapter) -> Result<Vec<u8>, AdapterError> {
    Ok(match copy {
        ServingCopy::F16 => serving_weights(adapter)?,
        ServingCopy::Int8 => int8_weights(adapter)?,
    })
}

/// (Re)writes a version's copy of kind `copy` from `adapter`, with `config` the verified config
/// bytes, and returns the copy's hash for the row: for versions stored before such copies
/// existed (or, for the int8 copy, by a server serving f16), and for a copy found damaged. The
/// copy goes to a temp file first and is renamed into place, so a reader never sees half of it.
pub fn write_copy(
    dir: &Path,
    copy: ServingCopy,
    adapter: &LoraAdapter,
    config: &[u8],
) -> Result<String, AdapterError> {
    let bytes = copy_bytes(copy, adapter)?;
    let file = copy_file(copy);
    let tmp = dir.join(format!(".{file}.{}", uuid::Uuid::new_v4().simple()));
    let written = (|| -> std::io::Result<()> {
        std::fs::write(&tmp, &bytes)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join(file))?;
        fsync_dir(dir)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(blake3_hex(config, &bytes))
}

/// Removes the temp files of copy writes a crash interrupted (see [`write_copy`]) from a live
/// version's directory; returns how many.
pub(super) fn remove_stray_copy_temps(version_dir: &Path) -> usize {
    let prefixes = [SERVING_FILE, SERVING_INT8_FILE].map(|f| format!(".{f}."));
    let Ok(entries) = std::fs::read_dir(version_dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|f| {
            let name = f.file_name().to_string_lossy().into_owned();
            prefixes.iter().any(|p| name.starts_with(p))
        })
        .filter(|f| std::fs::remove_file(f.path()).is_ok())
        .count()
}

pub(super) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
