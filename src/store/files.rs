//! Queries on the `files` table (uploaded training files, content stored in the row). Every
//! query is scoped by tenant: another tenant's id finds nothing, exactly like a missing one.
//! Listing never reads the content; only [`content`] does.

use sqlx::SqlitePool;

/// One file's metadata as the API shows it. `created_at` is unix seconds, derived from the
/// stored RFC 3339 text.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct FileRow {
    pub id: String,
    pub tenant: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub records: i64,
    pub created_at: i64,
}

const COLUMNS: &str = "id, tenant, filename, purpose, bytes, records, \
                       CAST(strftime('%s', created_at) AS INTEGER) AS created_at";

/// The caps [`insert`] enforces on what one tenant keeps stored.
#[derive(Clone, Copy, Debug)]
pub struct Quota {
    pub max_files: i64,
    pub max_bytes: i64,
}

/// Stores a file unless the tenant's files would then exceed `quota`; returns whether it was
/// stored. The check and the insert are one statement, so concurrent uploads cannot both slip
/// under the cap. `row.created_at` (unix seconds) is written as RFC 3339 UTC like every other
/// timestamp in the database.
pub async fn insert(
    db: &SqlitePool,
    row: &FileRow,
    content: &[u8],
    quota: Quota,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "INSERT INTO files (id, tenant, filename, purpose, bytes, records, content, created_at) \
         SELECT ?, ?, ?, ?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%SZ', ?, 'unixepoch') \
         WHERE (SELECT COUNT(*) FROM files WHERE tenant = ?) < ? \
           AND (SELECT COALESCE(SUM(bytes), 0) FROM files WHERE tenant = ?) + ? <= ?",
    )
    .bind(&row.id)
    .bind(&row.tenant)
    .bind(&row.filename)
    .bind(&row.purpose)
    .bind(row.bytes)
    .bind(row.records)
    .bind(content)
    .bind(row.created_at)
    .bind(&row.tenant)
    .bind(quota.max_files)
    .bind(&row.tenant)
    .bind(row.bytes)
    .bind(quota.max_bytes)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn get(db: &SqlitePool, tenant: &str, id: &str) -> sqlx::Result<Option<FileRow>> {
    let q = format!("SELECT {COLUMNS} FROM files WHERE tenant = ? AND id = ?");
    sqlx::query_as::<_, FileRow>(&q)
        .bind(tenant)
        .bind(id)
        .fetch_optional(db)
        .await
}

/// The stored bytes of one file.
pub async fn content(db: &SqlitePool, tenant: &str, id: &str) -> sqlx::Result<Option<Vec<u8>>> {
    sqlx::query_scalar("SELECT content FROM files WHERE tenant = ? AND id = ?")
        .bind(tenant)
        .bind(id)
        .fetch_optional(db)
        .await
}

/// The tenant's files, newest first.
pub async fn list(db: &SqlitePool, tenant: &str) -> sqlx::Result<Vec<FileRow>> {
    let q = format!(
        "SELECT {COLUMNS} FROM files WHERE tenant = ? ORDER BY created_at DESC, rowid DESC"
    );
    sqlx::query_as::<_, FileRow>(&q)
        .bind(tenant)
        .fetch_all(db)
        .await
}

/// Deletes one file; false when the tenant has no file with that id.
pub async fn delete(db: &SqlitePool, tenant: &str, id: &str) -> sqlx::Result<bool> {
    let r = sqlx::query("DELETE FROM files WHERE tenant = ? AND id = ?")
        .bind(tenant)
        .bind(id)
        .execute(db)
        .await?;
    Ok(r.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn another_tenants_file_is_invisible_like_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = crate::store::connect(&url).await.unwrap();
        sqlx::query(
            "INSERT INTO tenants (name, created_at) VALUES ('acme', '2024-01-01T00:00:00Z')",
        )
        .execute(&db)
        .await
        .unwrap();
        let row = FileRow {
            id: "file-1".into(),
            tenant: "acme".into(),
            filename: "a.jsonl".into(),
            purpose: "fine-tune".into(),
            bytes: 3,
            records: 1,
            created_at: 1_700_000_000,
        };
        let roomy = Quota {
            max_files: 10,
            max_bytes: 100,
        };
        assert!(insert(&db, &row, b"{}\n", roomy).await.unwrap());
        // A second file would pass the count but not the bytes: nothing is stored.
        let mut other = row.clone();
        other.id = "file-2".into();
        let tight = Quota {
            max_files: 10,
            max_bytes: 5,
        };
        assert!(!insert(&db, &other, b"{}\n", tight).await.unwrap());
        let one = Quota {
            max_files: 1,
            max_bytes: 100,
        };
        assert!(!insert(&db, &other, b"{}\n", one).await.unwrap());
        assert_eq!(get(&db, "acme", "file-2").await.unwrap(), None);
        assert_eq!(get(&db, "acme", "file-1").await.unwrap(), Some(row.clone()));
        assert_eq!(
            content(&db, "acme", "file-1").await.unwrap(),
            Some(b"{}\n".to_vec())
        );
        assert_eq!(get(&db, "default", "file-1").await.unwrap(), None);
        assert_eq!(content(&db, "default", "file-1").await.unwrap(), None);
        assert!(list(&db, "default").await.unwrap().is_empty());
        assert!(!delete(&db, "default", "file-1").await.unwrap());
        assert_eq!(list(&db, "acme").await.unwrap(), vec![row]);
        assert!(delete(&db, "acme", "file-1").await.unwrap());
        assert_eq!(get(&db, "acme", "file-1").await.unwrap(), None);
    }
}
