//! Queries on the `tenants` table. A tenant row exists before anything it owns (keys, adapters,
//! files, jobs reference it); `default` is created by the first migration.

use sqlx::SqlitePool;

/// Creates `name` if it does not exist yet; `now` is its `created_at`. Callers validate the
/// name first (`crate::adapters::validate_name`).
pub async fn ensure(db: &SqlitePool, name: &str, now: &str) -> sqlx::Result<()> {
    sqlx::query("INSERT OR IGNORE INTO tenants (name, created_at) VALUES (?, ?)")
        .bind(name)
        .bind(now)
        .execute(db)
        .await?;
    Ok(())
}

pub async fn exists(db: &SqlitePool, name: &str) -> sqlx::Result<bool> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tenants WHERE name = ?")
        .bind(name)
        .fetch_one(db)
        .await?;
    Ok(n > 0)
}
