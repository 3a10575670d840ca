//! Queries on the `adapters` table. Every query is scoped by tenant; a soft-deleted row is
//! invisible to all of them.

use serde::Serialize;
use sqlx::SqlitePool;

/// One adapter version as stored (and as the API shows it).
#[derive(Clone, Debug, Serialize, sqlx::FromRow, PartialEq)]
pub struct AdapterRow {
    pub tenant: String,
    pub name: String,
    pub version: i64,
    pub rank: i64,
    pub alpha: f64,
    /// JSON array text in the database; decoded for the API by the caller.
    pub target_modules: String,
    pub size_bytes: i64,
    pub sha256: String,
    /// BLAKE3 of the same bytes, verified at load (faster than sha256); `None` on rows older
    /// than the column. Internal: not part of the API's adapter object.
    #[serde(skip)]
    pub blake3: Option<String>,
    /// BLAKE3 over the config then `serving.safetensors` (the weights as served, f16 where
    /// they fit), verified when a cold load reads that copy; `None` on rows older than the
    /// column, which load from the uploaded files. Internal, like `blake3`.
    #[serde(skip)]
    pub serving_blake3: Option<String>,
    /// BLAKE3 over the config then `serving-int8.safetensors` (the int8 copy), verified when a
    /// cold load on a server with `adapters.precision = "int8"` reads it; `None` until such a
    /// server has written one. Internal, like `blake3`.
    #[serde(skip)]
    pub serving_int8_blake3: Option<String>,
    pub source: String,
    pub job_id: Option<String>,
    pub created_at: String,
}

const COLUMNS: &str = "tenant, name, version, rank, alpha, target_modules, size_bytes, sha256, blake3, serving_blake3, serving_int8_blake3, source, job_id, created_at";

/// The version a new upload of `name` gets: one past the highest ever used (deleted included,
/// so a version number is never reused for different content).
pub async fn next_version(db: &SqlitePool, tenant: &str, name: &str) -> sqlx::Result<i64> {
    let v: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM adapters WHERE tenant = ? AND name = ?")
            .bind(tenant)
            .bind(name)
            .fetch_one(db)
            .await?;
    Ok(v.unwrap_or(0) + 1)
}

/// `db`: the pool, or a transaction (a trained adapter is published with its job's success).
pub async fn insert<'e>(db: impl sqlx::SqliteExecutor<'e>, row: &AdapterRow) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO adapters (tenant, name, version, rank, alpha, target_modules, size_bytes, sha256, blake3, serving_blake3, serving_int8_blake3, source, job_id, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&row.tenant)
    .bind(&row.name)
    .bind(row.version)
    .bind(row.rank)
    .bind(row.alpha)
    .bind(&row.target_modules)
    .bind(row.size_bytes)
    .bind(&row.sha256)
    .bind(&row.blake3)
    .bind(&row.serving_blake3)
    .bind(&row.serving_int8_blake3)
    .bind(&row.source)
    .bind(&row.job_id)
    .bind(&row.created_at)
    .execute(db)
    .await?;
    Ok(())
}

/// A specific version, or the newest when `version` is `None`.
pub async fn find(
    db: &SqlitePool,
    tenant: &str,
    name: &str,
    version: Option<i64>,
) -> sqlx::Result<Option<AdapterRow>> {
    let q = match version {
        Some(_) => format!("SELECT {COLUMNS} FROM adapters WHERE tenant = ? AND name = ? AND version = ? AND deleted_at IS NULL"),
        None => format!(
            "SELECT {COLUMNS} FROM adapters WHERE tenant = ? AND name = ? AND deleted_at IS NULL ORDER BY version DESC LIMIT 1"
        ),
    };
    let mut query = sqlx::query_as::<_, AdapterRow>(&q).bind(tenant).bind(name);
    if let Some(v) = version {
        query = query.bind(v);
    }
    query.fetch_optional(db).await
}

/// The newest version of every adapter of `tenant`, by name.
pub async fn list_latest(db: &SqlitePool, tenant: &str) -> sqlx::Result<Vec<AdapterRow>> {
    let q = format!(
        "SELECT {COLUMNS} FROM adapters a WHERE tenant = ? AND deleted_at IS NULL AND version = \
         (SELECT MAX(version) FROM adapters b WHERE b.tenant = a.tenant AND b.name = a.name AND b.deleted_at IS NULL) \
         ORDER BY name"
    );
    sqlx::query_as::<_, AdapterRow>(&q)
        .bind(tenant)
        .fetch_all(db)
        .await
}

/// Every live version of one adapter, oldest first.
pub async fn versions(db: &SqlitePool, tenant: &str, name: &str) -> sqlx::Result<Vec<AdapterRow>> {
    let q = format!("SELECT {COLUMNS} FROM adapters WHERE tenant = ? AND name = ? AND deleted_at IS NULL ORDER BY version");
    sqlx::query_as::<_, AdapterRow>(&q)
        .bind(tenant)
        .bind(name)
        .fetch_all(db)
        .await
}

/// The copies of a version's weights written beside its upload, each with its own hash column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServingCopy {
    /// `serving.safetensors`: f16 where the values fit (`serving_blake3`).
    F16,
    /// `serving-int8.safetensors`: the int8 copy (`serving_int8_blake3`).
    Int8,
}

impl ServingCopy {
    fn column(self) -> &'static str {
        match self {
            Self::F16 => "serving_blake3",
            Self::Int8 => "serving_int8_blake3",
        }
    }
}

/// Records the hash of a version's (re)written copy.
pub async fn set_copy_blake3(
    db: &SqlitePool,
    copy: ServingCopy,
    tenant: &str,
    name: &str,
    version: i64,
    hash: &str,
) -> sqlx::Result<()> {
    let q = format!(
        "UPDATE adapters SET {} = ? WHERE tenant = ? AND name = ? AND version = ?",
        copy.column()
    );
    sqlx::query(&q)
        .bind(hash)
        .bind(tenant)
        .bind(name)
        .bind(version)
        .execute(db)
        .await?;
    Ok(())
}

/// Soft-deletes every version of `name`; returns how many rows changed.
pub async fn delete(db: &SqlitePool, tenant: &str, name: &str, now: &str) -> sqlx::Result<u64> {
    let r = sqlx::query(
        "UPDATE adapters SET deleted_at = ? WHERE tenant = ? AND name = ? AND deleted_at IS NULL",
    )
    .bind(now)
    .bind(tenant)
    .bind(name)
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

/// What `tenant` keeps stored: live adapter versions and the bytes of their weights.
pub async fn usage(db: &SqlitePool, tenant: &str) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as::<_, (i64, i64)>(
        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM adapters \
         WHERE tenant = ? AND deleted_at IS NULL",
    )
    .bind(tenant)
    .fetch_one(db)
    .await
}
