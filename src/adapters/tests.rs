//! Registry tests: names and references, timestamps, and publishing a trained adapter only
//! with its job's success.

use super::*;

#[test]
fn names_follow_the_documented_pattern() {
    for ok in ["a", "support", "v1.2_x-y", &"a".repeat(64)] {
        validate_name("name", ok).unwrap();
    }
    for bad in [
        "",
        "A",
        "-a",
        ".a",
        "..",
        "a/b",
        "a\0",
        "é",
        "ѕupport",
        &"a".repeat(65),
        "a b",
    ] {
        assert!(validate_name("name", bad).is_err(), "{bad:?}");
    }
}

#[test]
fn references_split_name_and_version() {
    assert_eq!(parse_ref("x").unwrap(), ("x".into(), None));
    assert_eq!(parse_ref("x@3").unwrap(), ("x".into(), Some(3)));
    for bad in ["x@0", "x@-1", "x@a", "@1", "X@1"] {
        assert!(parse_ref(bad).is_err(), "{bad}");
    }
}

/// A database, the tiny test model's config, a random adapter's files (`rank`, `seed`) and
/// the limits and store root a registry over them takes.
struct Fixture {
    db: SqlitePool,
    base: ModelConfig,
    config: Vec<u8>,
    weights: Vec<u8>,
    limits: LoraLimits,
    root: PathBuf,
}

async fn fixture(dir: &std::path::Path, rank: usize, seed: u64) -> Fixture {
    let url = format!("sqlite://{}", dir.join("t.db").display());
    let db = crate::store::connect(&url).await.unwrap();
    let base = ModelConfig::tiny_for_tests();
    let files = dir.join("upload");
    crate::bench::adapters::write_random_adapter(&base, "tiny", rank, seed, &files).unwrap();
    Fixture {
        db,
        config: std::fs::read(files.join(CONFIG_FILE)).unwrap(),
        weights: std::fs::read(files.join(WEIGHTS_FILE)).unwrap(),
        base,
        limits: LoraLimits {
            max_rank: 64,
            max_bytes: 1 << 24,
        },
        root: dir.join("adapters"),
    }
}

/// A cancel that lands while a trained adapter is being stored (after the runner's last
/// check) must leave a cancelled job and no published version — and a job still running
/// ends succeeded together with its version.
#[tokio::test]
async fn a_job_adapter_is_published_only_with_the_jobs_success() {
    let dir = tempfile::tempdir().unwrap();
    let Fixture {
        db,
        base,
        config,
        weights,
        limits,
        root,
    } = fixture(dir.path(), 4, 1).await;
    let registry = AdapterRegistry::new(db.clone(), root.clone(), base, limits, 1 << 24);
    for (id, status) in [("job-cancelled", "cancelled"), ("job-running", "running")] {
        sqlx::query(
            "INSERT INTO finetune_jobs (id, tenant, method, status, adapter_name, request, \
             created_at) VALUES (?, 'default', 'sft', ?, 'learned', '{}', ?)",
        )
        .bind(id)
        .bind(status)
        .bind(now_rfc3339())
        .execute(&db)
        .await
        .unwrap();
    }
    let status = |id: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_as::<_, (String, Option<i64>)>(
                "SELECT status, adapter_version FROM finetune_jobs WHERE id = ?",
            )
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };

    let cancelled = registry
        .create(
            "default",
            "learned",
            config.clone(),
            weights.clone(),
            "finetune",
            Some("job-cancelled".into()),
        )
        .await;
    assert!(matches!(cancelled, Err(AdapterError::JobNotRunning(_))));
    assert!(registry.find("default", "learned").await.is_err());
    assert!(
        !root.join("default/learned/1").exists(),
        "its files went too"
    );
    assert_eq!(status("job-cancelled").await, ("cancelled".into(), None));

    let done = registry
        .create(
            "default",
            "learned",
            config,
            weights,
            "finetune",
            Some("job-running".into()),
        )
        .await
        .unwrap();
    assert_eq!(
        done.row.version, 1,
        "the rolled-back version number is free"
    );
    assert_eq!(status("job-running").await, ("succeeded".into(), Some(1)));
    assert!(registry.find("default", "learned@1").await.is_ok());
}

#[test]
fn timestamps_are_rfc3339_utc() {
    let t = now_rfc3339();
    assert_eq!(t.len(), 20, "{t}");
    assert!(t.starts_with("20") && t.ends_with('Z'));
}

/// With `adapters.precision = "int8"` both ways into the resident cache (an upload, and a cold
/// load from the store) hold int8 pairs at about half the bytes, while the serving copy on
/// disk stays f16, so the same store serves either precision.
#[tokio::test]
async fn int8_precision_holds_resident_adapters_in_int8() {
    let dir = tempfile::tempdir().unwrap();
    let Fixture {
        db,
        base,
        config,
        weights,
        limits,
        root,
    } = fixture(dir.path(), 8, 3).await;
    let f16 = AdapterRegistry::new(db.clone(), root.clone(), base.clone(), limits, 1 << 24);
    let made = f16
        .create(
            "default",
            "x",
            config.clone(),
            weights.clone(),
            "upload",
            None,
        )
        .await
        .unwrap();
    let f16_bytes = made.adapter.size_bytes;
    let int8 = AdapterRegistry::new(db.clone(), root.clone(), base, limits, 1 << 24)
        .with_precision(AdapterPrecision::Int8);
    let uploaded = int8
        .create("default", "y", config, weights, "upload", None)
        .await
        .unwrap();
    // A fresh registry has nothing resident: `x` is a cold load from the store.
    let cold = int8.resolve("default", "x").await.unwrap();
    for adapter in [&uploaded.adapter, &cold.adapter] {
        let pairs: Vec<_> = adapter
            .layers
            .iter()
            .flat_map(|l| l.modules.iter().flatten())
            .collect();
        assert!(!pairs.is_empty());
        for p in pairs {
            assert_eq!(p.a.dtype(), candle_core::DType::U8);
            assert!(p.int8.is_some());
        }
        assert!(
            adapter.size_bytes * 10 < f16_bytes * 6,
            "{} int8 bytes against {f16_bytes} f16",
            adapter.size_bytes
        );
    }
    let serving = std::fs::read(root.join("default/x/1").join(SERVING_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&serving).unwrap();
    assert!(st
        .tensors()
        .iter()
        .all(|(_, v)| v.dtype() == safetensors::Dtype::F16));
}
