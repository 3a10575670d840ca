//! Queries on the `api_keys` table. Only a key's SHA-256 (hex) is stored; the secret itself is
//! never written and no query returns the hash to callers other than the lookup by hash.

use sqlx::SqlitePool;

/// A key as listed: everything but the secret and its hash.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct KeyRow {
    pub id: String,
    pub tenant: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

pub async fn insert(
    db: &SqlitePool,
    id: &str,
    tenant: &str,
    key_hash: &str,
    now: &str,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO api_keys (id, tenant, key_hash, created_at) VALUES (?, ?, ?, ?)")
        .bind(id)
        .bind(tenant)
        .bind(key_hash)
        .bind(now)
        .execute(db)
        .await?;
    Ok(())
}

/// Every key, revoked ones included, oldest first.
pub async fn list(db: &SqlitePool) -> sqlx::Result<Vec<KeyRow>> {
    sqlx::query_as::<_, KeyRow>(
        "SELECT id, tenant, created_at, revoked_at FROM api_keys ORDER BY created_at, id",
    )
    .fetch_all(db)
    .await
}

pub async fn find(db: &SqlitePool, id: &str) -> sqlx::Result<Option<KeyRow>> {
    sqlx::query_as::<_, KeyRow>(
        "SELECT id, tenant, created_at, revoked_at FROM api_keys WHERE id = ?",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Marks key `id` revoked at `now`; false when there is no such key or it was already revoked.
pub async fn revoke(db: &SqlitePool, id: &str, now: &str) -> sqlx::Result<bool> {
    let r = sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
        .bind(now)
        .bind(id)
        .execute(db)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// The tenant of the non-revoked key whose hash is `key_hash`, if any.
pub async fn tenant_by_hash(db: &SqlitePool, key_hash: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT tenant FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL")
        .bind(key_hash)
        .fetch_optional(db)
        .await
}

/// How many keys are not revoked (a server with auth on and none of these admits nobody).
pub async fn count_active(db: &SqlitePool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL")
        .fetch_one(db)
        .await
}
