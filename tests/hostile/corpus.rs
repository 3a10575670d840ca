//! The committed corpus: tests/fixtures/hostile/<kind>/ holds one nasty input per file (made
//! by tests/fixtures/hostile/make_corpus.py; add a file there whenever a bug is found). Every
//! run replays every file.

use std::path::PathBuf;

fn dir(kind: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hostile")
        .join(kind)
}

/// Every file of `kind` as (file name, bytes), sorted by name; panics if there are none, so a
/// moved corpus cannot silently turn the replay into a no-op.
pub fn files(kind: &str) -> Vec<(String, Vec<u8>)> {
    let d = dir(kind);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", d.display()))
        .map(|e| {
            let path = e.expect("corpus entry").path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = std::fs::read(&path).expect("corpus file");
            (name, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "corpus {} is empty", d.display());
    out
}
