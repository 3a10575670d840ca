//! A stored version's files: the hashes recorded at upload, the verified cold load (read once,
//! hash and parse the same bytes), and the f16 serving copy written beside the upload.

use std::path::Path;

use candle_core::Device;
use sha2::{Digest, Sha256};

use super::{AdapterError, CONFIG_FILE, SERVING_FILE, WEIGHTS_FILE};
use crate::engine::lora::peft::{parse_peft_file, serving_weights, LoraLimits, WeightsFile};
use crate::engine::lora::LoraAdapter;
use crate::engine::model::ModelConfig;
use crate::store::adapters::AdapterRow;

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
        || {
            weights.with_bytes(|bytes| match recorded {
                Recorded::Blake3(_) => {
                    let mut h = blake3::Hasher::new();
                    h.update(&config);
                    h.update_rayon(bytes);
                    h.finalize().to_hex().to_string()
                }
                Recorded::Sha256(_) => sha256_hex(&config, bytes),
            })
        },
        || parse_peft_file(&config, &weights, base, limits, device),
    );
    tracing::debug!(
        file = weights_file,
        bytes = weights.len(),
        read_ms = read.as_secs_f64() * 1e3,
        verify_and_parse_ms = (started.elapsed() - read).as_secs_f64() * 1e3,
        "adapter files read, hashed and parsed"
    );
    let (Recorded::Blake3(want) | Recorded::Sha256(want)) = recorded;
    if found != *want {
        return Err(AdapterError::Storage(format!(
            "{weights_file} and {CONFIG_FILE} hash to {found}, not the recorded {want}"
        )));
    }
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

/// (Re)writes a version's serving copy from an adapter just loaded and verified from its
/// upload, with `config` the verified config bytes, and returns the copy's hash for the row.
/// For versions stored before serving copies existed, and for a copy found damaged. The copy
/// goes to a temp file first and is renamed into place, so a reader never sees half of it.
pub fn write_serving_copy(
    dir: &Path,
    adapter: &LoraAdapter,
    config: &[u8],
) -> Result<String, AdapterError> {
    let serving = serving_weights(adapter)?;
    let tmp = dir.join(format!(".{SERVING_FILE}.{}", uuid::Uuid::new_v4().simple()));
    let written = (|| -> std::io::Result<()> {
        std::fs::write(&tmp, &serving)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join(SERVING_FILE))?;
        fsync_dir(dir)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(blake3_hex(config, &serving))
}

/// Removes the temp files of serving-copy writes a crash interrupted (see
/// [`write_serving_copy`]) from a live version's directory; returns how many.
pub(super) fn remove_stray_serving_temps(version_dir: &Path) -> usize {
    let prefix = format!(".{SERVING_FILE}.");
    let Ok(entries) = std::fs::read_dir(version_dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|f| std::fs::remove_file(f.path()).is_ok())
        .count()
}

pub(super) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
