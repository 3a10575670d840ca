//! An adapter weights file read into memory that the served tensors share, and the warm
//! buffer a cold load reads it into.
//!
//! Why: on our VMs a cold load's cost was mostly first touches of fresh memory (a page fault
//! per 4 KiB, ~1 ms per MB: reading a 9.8 MB serving copy into fresh memory took 6–12 ms,
//! into memory already touched 1.6 ms), and it paid them twice, once for the read buffer and
//! again for the tensors it copied into. Here the tensors are views of the read buffer, and
//! the buffer is one that a helper thread touched after the previous cold load, so the
//! request pays neither (BENCHMARKS.md, "Cold adapter").

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::{CpuStorage, Device, Storage, Tensor};
use half::f16;
use half::vec::HalfBitsVecExt;

/// A safetensors file in memory: the bytes live in one f16 CPU tensor (so they are aligned
/// for f16), and [`super::parse_peft_file`] makes an all-f16 file's A and B views of it. The
/// bytes are never written after the read, so what a caller hashes through
/// [`WeightsFile::with_bytes`] is what the tensors hold.
pub struct WeightsFile {
    /// The bytes as f16 words, the last one zero-padded when the length is odd.
    pub(super) words: Tensor,
    len: usize,
}

impl WeightsFile {
    /// Reads the file at `path`, refusing one over `max_bytes` before allocating for it. With
    /// `warm`, for a file that will be served from this memory (the serving copy), it is read
    /// into the buffer touched after the previous such read, and a helper touches one for the
    /// next; a file that is only converted and dropped (an f32 upload) reads into plain memory.
    pub fn read(path: &Path, max_bytes: usize, warm: bool) -> std::io::Result<Self> {
        let (words, len) = read_whole(path, max_bytes, warm.then_some(&WARM_FILES))?;
        Self::from_words(words, len).map_err(std::io::Error::other)
    }

    /// The bytes of a file already in memory (copied once).
    pub fn from_bytes(bytes: &[u8]) -> candle_core::Result<Self> {
        let mut words = vec![0u16; bytes.len().div_ceil(2)];
        bytemuck::cast_slice_mut::<u16, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self::from_words(words, bytes.len())
    }

    fn from_words(words: Vec<u16>, len: usize) -> candle_core::Result<Self> {
        let words: Vec<f16> = words.reinterpret_into();
        let n = words.len();
        Ok(Self {
            words: Tensor::from_vec(words, n, &Device::Cpu)?,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `f` on the file's bytes.
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        self.with_words(|bytes, _| f(bytes))
    }

    /// Runs `f` on the file's bytes and the same memory as f16 words.
    pub(super) fn with_words<R>(&self, f: impl FnOnce(&[u8], &[f16]) -> R) -> R {
        let (storage, _) = self.words.storage_and_layout();
        let words: &[f16] = match &*storage {
            Storage::Cpu(CpuStorage::F16(w)) => w,
            // Built from a Vec<f16> on the CPU in `from_words`, so never another storage.
            _ => &[],
        };
        let bytes: &[u8] = bytemuck::cast_slice(words);
        f(&bytes[..self.len.min(bytes.len())], words)
    }
}

/// Reads the whole file at `path` into a buffer of `T` (the one `pool` touched in advance,
/// else fresh memory; the last value zero-padded), refusing a file over `max_bytes` before
/// allocating for it and one that grows while it is read. Returns the buffer and the file's
/// length in bytes.
pub(super) fn read_whole<T: bytemuck::Pod + Default + Send>(
    path: &Path,
    max_bytes: usize,
    pool: Option<&'static WarmPool<T>>,
) -> std::io::Result<(Vec<T>, usize)> {
    let mut file = std::fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    if len > max_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} is {len} bytes, over the limit of {max_bytes} bytes",
                path.display()
            ),
        ));
    }
    let n = len.div_ceil(std::mem::size_of::<T>().max(1));
    let mut buffer = match pool {
        Some(pool) => pool.take(n),
        None => vec![T::default(); n],
    };
    file.read_exact(&mut bytemuck::cast_slice_mut::<T, u8>(&mut buffer)[..len])?;
    if file.read(&mut [0u8; 1])? != 0 {
        return Err(std::io::Error::other(format!(
            "{} grew while it was being read",
            path.display()
        )));
    }
    Ok((buffer, len))
}

/// The largest buffer kept touched in advance (per kind): adapters past it (rank 64 on every
/// module of a bigger model) take fresh memory, so an idle server never holds more than this
/// spare of each.
const MAX_WARM_BYTES: usize = 64 << 20;

/// A buffer touched in advance for the next cold load of one kind (the serving copy's bytes,
/// or an int8 copy's values), the length the last load took, and whether a helper is making
/// one.
pub(crate) struct WarmPool<T: 'static> {
    spare: Mutex<Option<Vec<T>>>,
    last_len: AtomicUsize,
    filling: AtomicBool,
}

/// Has a helper touch a buffer for the next cold load of each kind, of the length the last one
/// took. Called when a cold load is done rather than when its buffers are taken: a helper that
/// starts at the take spends its ~10 ms of page faults beside the load's own hash, parse and
/// int8 copy on our 2-core VMs.
pub fn refill_warm_buffers() {
    WARM_FILES.refill();
    WARM_INT8.refill();
    WARM_INT8_FILES.refill();
}

/// The serving copies' read buffers (u16 words: f16-aligned).
static WARM_FILES: WarmPool<u16> = WarmPool::new();

/// The int8 copies' buffers (`adapters.precision = "int8"`), made from an f16 form.
pub(crate) static WARM_INT8: WarmPool<u8> = WarmPool::new();

/// The read buffers of stored int8 copies (`serving-int8.safetensors`), served in place.
pub(super) static WARM_INT8_FILES: WarmPool<u8> = WarmPool::new();

impl<T: Copy + Default + Send + 'static> WarmPool<T> {
    const fn new() -> Self {
        Self {
            spare: Mutex::new(None),
            last_len: AtomicUsize::new(0),
            filling: AtomicBool::new(false),
        }
    }

    /// A buffer of `len` values: the warm one when it has that length (adapters of one shape
    /// make buffers of one size), else fresh memory. [`refill_warm_buffers`] then has one of
    /// this length touched for the next cold load.
    pub(crate) fn take(&'static self, len: usize) -> Vec<T> {
        let taken = self
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_if(|b| b.len() == len);
        let bytes = len.saturating_mul(std::mem::size_of::<T>());
        if bytes <= MAX_WARM_BYTES {
            self.last_len.store(len, Ordering::Release);
        }
        taken.unwrap_or_else(|| {
            // Either the helper for this load's buffer had not finished, or the shape changed:
            // the load pays the first touches itself (~1 ms per MB here).
            tracing::debug!(bytes, "no warm buffer ready: fresh memory");
            vec![T::default(); len]
        })
    }

    /// Spawns a helper that touches a buffer of the last taken length, unless the spare has
    /// that length already or a helper is at work.
    fn refill(&'static self) {
        let len = self.last_len.load(Ordering::Acquire);
        let ready = self
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|b| b.len() == len);
        if len > 0 && !ready && !self.filling.swap(true, Ordering::AcqRel) {
            let spawned = std::thread::Builder::new()
                .name("adapterd-warm-buffer".into())
                .spawn(move || {
                    lowest_priority();
                    let buffer = touched::<T>(len);
                    *self.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(buffer);
                    self.filling.store(false, Ordering::Release);
                });
            if spawned.is_err() {
                self.filling.store(false, Ordering::Release);
            }
        }
    }
}

/// Puts the calling thread at nice 19, so it runs on cores the forward leaves idle rather than
/// beside a request's prefill (a 10 MB buffer is ~10 ms of page faults on our VMs).
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's id; a failure leaves the priority as is.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

/// `len` default (zero) values whose every page has been written, so the kernel has backed
/// them.
fn touched<T: Copy + Default>(len: usize) -> Vec<T> {
    let mut buffer = vec![T::default(); len];
    // One write per 4 KiB page. Volatile: the allocator's zeroed pages look written already
    // to the optimizer, which would drop plain stores of zero.
    for page in buffer.chunks_mut((4096 / std::mem::size_of::<T>().max(1)).max(1)) {
        // SAFETY: `page` is a non-empty, valid, exclusive slice.
        unsafe { std::ptr::write_volatile(page.as_mut_ptr(), T::default()) };
    }
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(file: &WeightsFile) -> Vec<u8> {
        file.with_bytes(|b| b.to_vec())
    }

    #[test]
    fn a_read_file_holds_exactly_its_bytes_odd_length_included() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1, 2, 7, 4096, 9_999] {
            let content: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8 | 1).collect();
            let path = dir.path().join(format!("w{len}"));
            std::fs::write(&path, &content).unwrap();
            // Plain, then warm twice: the second may get the buffer the refill after the first
            // had touched.
            for warm in [false, true, true] {
                let file = WeightsFile::read(&path, 1 << 20, warm).unwrap();
                refill_warm_buffers();
                assert_eq!(file.len(), len);
                assert_eq!(bytes_of(&file), content);
            }
            assert_eq!(
                bytes_of(&WeightsFile::from_bytes(&content).unwrap()),
                content
            );
        }
    }

    #[test]
    fn a_file_over_the_limit_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        let err = WeightsFile::read(&path, 999, true).err().unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("over the limit of 999 bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_pool_refills_only_when_asked_and_with_the_length_last_taken() {
        static POOL: WarmPool<u8> = WarmPool::new();
        let spare_ptr = || {
            POOL.spare
                .lock()
                .unwrap()
                .as_ref()
                .map(|b| (b.as_ptr() as usize, b.len()))
        };
        // Nothing taken yet: nothing to refill.
        POOL.refill();
        assert!(!POOL.filling.load(Ordering::Acquire));
        assert_eq!(POOL.take(3000).len(), 3000);
        // Taking spawns no helper: the load's own work gets the cores.
        assert!(!POOL.filling.load(Ordering::Acquire));
        assert_eq!(spare_ptr(), None);
        POOL.refill();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (ptr, len) = loop {
            if let Some(s) = spare_ptr() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no spare after refill"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(len, 3000);
        // The next take of that length gets the touched buffer.
        let warm = POOL.take(3000);
        assert_eq!(warm.as_ptr() as usize, ptr);
        assert_eq!(spare_ptr(), None);
    }

    #[test]
    fn a_warm_buffer_is_all_zero_and_of_the_size_asked() {
        let b = touched::<u16>(5000);
        assert_eq!(b.len(), 5000);
        assert!(b.iter().all(|&w| w == 0));
    }
}
