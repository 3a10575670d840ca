//! Queries on `finetune_jobs` and `job_events`. API-facing reads are scoped by tenant (another
//! tenant's job id finds nothing, exactly like a missing one); the runner's claims and updates
//! work by id. Status changes are conditional on the current status, so a cancelled job can
//! never be turned into a succeeded one by a runner that finished a step late.

use sqlx::SqlitePool;

#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub tenant: String,
    pub method: String,
    pub status: String,
    pub adapter_name: String,
    pub adapter_version: Option<i64>,
    /// The validated request (method, hyperparameters) as JSON.
    pub request: String,
    pub step: i64,
    pub total_steps: i64,
    /// Latest metrics as JSON.
    pub metrics: String,
    pub error: Option<String>,
    pub checkpoint_path: Option<String>,
    pub dataset_sha256: Option<String>,
    pub training_file: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub job_id: String,
    pub created_at: String,
    pub level: String,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub message: String,
    pub data: Option<String>,
}

const COLUMNS: &str = "id, tenant, method, status, adapter_name, adapter_version, request, step, \
    total_steps, metrics, error, checkpoint_path, dataset_sha256, training_file, created_at, \
    started_at, finished_at";

pub const TERMINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// Inserts a queued job with its dataset.
pub async fn insert(db: &SqlitePool, row: &JobRow, dataset: &[u8]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO finetune_jobs (id, tenant, method, status, adapter_name, request, step, \
         total_steps, metrics, dataset, dataset_sha256, training_file, created_at) \
         VALUES (?, ?, ?, 'queued', ?, ?, 0, ?, '{}', ?, ?, ?, ?)",
    )
    .bind(&row.id)
    .bind(&row.tenant)
    .bind(&row.method)
    .bind(&row.adapter_name)
    .bind(&row.request)
    .bind(row.total_steps)
    .bind(dataset)
    .bind(&row.dataset_sha256)
    .bind(&row.training_file)
    .bind(&row.created_at)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn get(db: &SqlitePool, tenant: &str, id: &str) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM finetune_jobs WHERE tenant = ? AND id = ?"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(db)
    .await
}

pub async fn get_by_id(db: &SqlitePool, id: &str) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM finetune_jobs WHERE id = ?"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// The tenant's jobs, newest first.
pub async fn list(db: &SqlitePool, tenant: &str, limit: i64) -> sqlx::Result<Vec<JobRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM finetune_jobs WHERE tenant = ? \
         ORDER BY created_at DESC, rowid DESC LIMIT ?"
    ))
    .bind(tenant)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Jobs of `tenant` not yet finished (queued or running).
pub async fn count_active(db: &SqlitePool, tenant: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM finetune_jobs WHERE tenant = ? AND status IN ('queued', 'running')",
    )
    .bind(tenant)
    .fetch_one(db)
    .await
}

/// Counts by status (for the `finetune_jobs{status}` gauge).
pub async fn count_by_status(db: &SqlitePool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT status, COUNT(*) FROM finetune_jobs GROUP BY status")
        .fetch_all(db)
        .await
}

/// Marks the oldest queued job running and returns it with its dataset.
pub async fn claim_next(db: &SqlitePool, now: &str) -> sqlx::Result<Option<(JobRow, Vec<u8>)>> {
    let mut tx = db.begin().await?;
    let id: Option<String> = sqlx::query_scalar(
        "SELECT id FROM finetune_jobs WHERE status = 'queued' ORDER BY created_at, rowid LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = id else {
        return Ok(None);
    };
    sqlx::query(
        "UPDATE finetune_jobs SET status = 'running', started_at = COALESCE(started_at, ?) \
         WHERE id = ? AND status = 'queued'",
    )
    .bind(now)
    .bind(&id)
    .execute(&mut *tx)
    .await?;
    let row: JobRow = sqlx::query_as(&format!("SELECT {COLUMNS} FROM finetune_jobs WHERE id = ?"))
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
    let dataset: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT dataset FROM finetune_jobs WHERE id = ?")
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(Some((row, dataset.unwrap_or_default())))
}

/// Jobs left `running` by a process that died: queued again, to resume from their checkpoint.
pub async fn requeue_interrupted(db: &SqlitePool) -> sqlx::Result<Vec<String>> {
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT id FROM finetune_jobs WHERE status = 'running'")
            .fetch_all(db)
            .await?;
    sqlx::query("UPDATE finetune_jobs SET status = 'queued' WHERE status = 'running'")
        .execute(db)
        .await?;
    Ok(ids)
}

/// Progress after a step (only while running).
pub async fn record_progress(
    db: &SqlitePool,
    id: &str,
    step: i64,
    total_steps: i64,
    metrics: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE finetune_jobs SET step = ?, total_steps = ?, metrics = ? \
         WHERE id = ? AND status = 'running'",
    )
    .bind(step)
    .bind(total_steps)
    .bind(metrics)
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn set_checkpoint(db: &SqlitePool, id: &str, path: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE finetune_jobs SET checkpoint_path = ? WHERE id = ?")
        .bind(path)
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// Moves a running job to a terminal status; false when it was no longer running (cancelled).
/// The job's copy of its dataset is dropped: only queued and running jobs need it (to start, or
/// to resume after a restart), and a finished job keeps its `dataset_sha256` as lineage.
/// `db`: the pool, or a transaction (the registry publishes a trained adapter in the same one).
pub async fn finish<'e>(
    db: impl sqlx::SqliteExecutor<'e>,
    id: &str,
    status: &str,
    error: Option<&str>,
    adapter_version: Option<i64>,
    now: &str,
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE finetune_jobs SET status = ?, error = ?, adapter_version = ?, finished_at = ?, \
         dataset = NULL WHERE id = ? AND status = 'running'",
    )
    .bind(status)
    .bind(error)
    .bind(adapter_version)
    .bind(now)
    .bind(id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Cancels a queued or running job of `tenant`. Returns the job as it now is, or `None` when
/// there is no such job; a finished job is returned unchanged.
pub async fn cancel(
    db: &SqlitePool,
    tenant: &str,
    id: &str,
    now: &str,
) -> sqlx::Result<Option<JobRow>> {
    sqlx::query(
        "UPDATE finetune_jobs SET status = 'cancelled', finished_at = ?, dataset = NULL \
         WHERE tenant = ? AND id = ? AND status IN ('queued', 'running')",
    )
    .bind(now)
    .bind(tenant)
    .bind(id)
    .execute(db)
    .await?;
    get(db, tenant, id).await
}

pub async fn add_event(
    db: &SqlitePool,
    job_id: &str,
    now: &str,
    level: &str,
    kind: &str,
    message: &str,
    data: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO job_events (job_id, created_at, level, type, message, data) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(job_id)
    .bind(now)
    .bind(level)
    .bind(kind)
    .bind(message)
    .bind(data)
    .execute(db)
    .await?;
    Ok(())
}

/// Events of a job after event id `after`, oldest first (callers check the job's tenant).
pub async fn events(
    db: &SqlitePool,
    job_id: &str,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(
        "SELECT id, job_id, created_at, level, type, message, data FROM job_events \
         WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
    )
    .bind(job_id)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> JobRow {
        JobRow {
            id: id.into(),
            tenant: "default".into(),
            method: "sft".into(),
            status: "queued".into(),
            adapter_name: "a".into(),
            adapter_version: None,
            request: "{}".into(),
            step: 0,
            total_steps: 2,
            metrics: "{}".into(),
            error: None,
            checkpoint_path: None,
            dataset_sha256: Some("00".into()),
            training_file: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            started_at: None,
            finished_at: None,
        }
    }

    async fn dataset_bytes(db: &SqlitePool, id: &str) -> Option<i64> {
        sqlx::query_scalar("SELECT length(dataset) FROM finetune_jobs WHERE id = ?")
            .bind(id)
            .fetch_one(db)
            .await
            .unwrap()
    }

    /// A job's dataset copy is kept while it may still run (queued, running, interrupted) and
    /// dropped when it ends, however it ends; its hash stays as lineage.
    #[tokio::test]
    async fn a_finished_job_drops_its_dataset_and_keeps_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = crate::store::connect(&url).await.unwrap();
        let now = "2026-01-01T00:00:01Z";
        for id in ["ends", "cancelled-queued"] {
            insert(&db, &job(id), b"{\"prompt\":\"a\",\"completion\":\"b\"}\n")
                .await
                .unwrap();
        }
        let (claimed, data) = claim_next(&db, now).await.unwrap().unwrap();
        assert_eq!(claimed.id, "ends");
        assert_eq!(data.len(), 32, "a running job still has its data");
        requeue_interrupted(&db).await.unwrap();
        let (_, data) = claim_next(&db, now).await.unwrap().unwrap();
        assert_eq!(data.len(), 32, "and so does one resumed after a restart");
        assert!(finish(&db, "ends", "failed", Some("x"), None, now)
            .await
            .unwrap());
        assert_eq!(dataset_bytes(&db, "ends").await, None);
        cancel(&db, "default", "cancelled-queued", now)
            .await
            .unwrap();
        assert_eq!(dataset_bytes(&db, "cancelled-queued").await, None);
        let kept = get(&db, "default", "ends").await.unwrap().unwrap();
        assert_eq!(kept.dataset_sha256.as_deref(), Some("00"));
    }
}
