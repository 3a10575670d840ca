//! `/v1/adapters`: upload (multipart; the same name again makes a new version), list, show and
//! delete the caller's LoRA adapters. Validation happens before anything is stored. Every call
//! is scoped to the caller's [`Tenant`]: another tenant's adapter answers the same 404 as a
//! missing one.

use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Tenant;
use super::{ApiError, AppState};
use crate::adapters::{AdapterError, CONFIG_FILE, WEIGHTS_FILE};
use crate::store::adapters::AdapterRow;

pub fn routes(max_upload_bytes: usize) -> Router<AppState> {
    Router::new()
        .route(
            "/v1/adapters",
            get(list)
                .post(upload)
                .layer(DefaultBodyLimit::max(max_upload_bytes)),
        )
        .route("/v1/adapters/{name}", get(show).delete(remove))
}

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        match &e {
            AdapterError::InvalidName(m) => ApiError::invalid_field(m),
            AdapterError::Invalid(e) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_adapter",
                e.to_string(),
            ),
            AdapterError::NotFound(n) => ApiError::not_found(format!("adapter `{n}` not found")),
            AdapterError::Damaged(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "adapter_damaged",
                e.to_string(),
            ),
            AdapterError::Storage(m) => ApiError::internal(m),
            AdapterError::QuotaExceeded(m) => ApiError::quota_exceeded(m),
            // Only the job runner registers with a job id; no route reaches this.
            AdapterError::JobNotRunning(_) => ApiError::internal(&e),
        }
    }
}

/// The adapter object of the API contract.
pub fn adapter_json(row: &AdapterRow) -> Value {
    let modules: Value =
        serde_json::from_str(&row.target_modules).unwrap_or(Value::Array(Vec::new()));
    json!({
        "name": row.name,
        "version": row.version,
        "tenant": row.tenant,
        "rank": row.rank,
        "alpha": row.alpha,
        "target_modules": modules,
        "size_bytes": row.size_bytes,
        "sha256": row.sha256,
        "created_at": row.created_at,
        "source": row.source,
        "job_id": row.job_id,
    })
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the upload exceeds adapters.max_upload_bytes",
        )
    } else {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    }
}

/// Longest `name` part read; a valid name is at most 64 bytes.
const MAX_NAME_PART: usize = 256;

/// The `name` part as it was sent: strict UTF-8, no byte-order mark stripped (multer's
/// `text()` drops a leading BOM, which turned `\u{feff}support` into `support`), at most
/// [`MAX_NAME_PART`] bytes read. `validate_name` then judges it.
async fn read_name(mut field: axum::extract::multipart::Field<'_>) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if buf.len() + chunk.len() > MAX_NAME_PART {
            return Err(ApiError::invalid_field(format!(
                "`name` must match [a-z0-9][a-z0-9._-]{{0,63}} (got more than {MAX_NAME_PART} bytes)"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| {
        ApiError::invalid_field(
            "`name` must match [a-z0-9][a-z0-9._-]{0,63} (got bytes that are not UTF-8)",
        )
    })
}

async fn upload(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    let (mut name, mut config, mut weights) = (None, None, None);
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        // A part is named by its field name or, for files, its file name.
        let key = field.name().unwrap_or_default().to_owned();
        let file = field.file_name().unwrap_or_default().to_owned();
        let is = |n: &str| key == n || file == n;
        if key == "name" {
            name = Some(read_name(field).await?);
        } else if is(CONFIG_FILE) {
            config = Some(field.bytes().await.map_err(multipart_error)?.to_vec());
        } else if is(WEIGHTS_FILE) {
            weights = Some(field.bytes().await.map_err(multipart_error)?.to_vec());
        } else if file.ends_with(".bin") || file.ends_with(".pt") || file.ends_with(".pth") {
            return Err(ApiError::invalid_field(format!(
                "`{file}`: pickle weight files are not accepted; upload {WEIGHTS_FILE} (safetensors)"
            )));
        } else {
            return Err(ApiError::invalid_field(format!(
                "unexpected part `{key}`; send `name`, `{CONFIG_FILE}` and `{WEIGHTS_FILE}`"
            )));
        }
    }
    let name = name.ok_or_else(|| ApiError::invalid_field("the `name` part is missing"))?;
    let config = config
        .ok_or_else(|| ApiError::invalid_field(format!("the `{CONFIG_FILE}` part is missing")))?;
    let weights = weights
        .ok_or_else(|| ApiError::invalid_field(format!("the `{WEIGHTS_FILE}` part is missing")))?;
    let created = state
        .adapters
        .create(&tenant, &name, config, weights, "upload", None)
        .await?;
    Ok((StatusCode::CREATED, Json(adapter_json(&created.row))).into_response())
}

async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
) -> Result<Json<Value>, ApiError> {
    let rows = state.adapters.list(&tenant).await?;
    Ok(Json(
        json!({"object": "list", "data": rows.iter().map(adapter_json).collect::<Vec<_>>()}),
    ))
}

/// The newest version, with every live version listed under `versions`.
async fn show(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let versions = state.adapters.versions(&tenant, &name).await?;
    let newest = versions
        .last()
        .ok_or_else(|| ApiError::not_found(format!("adapter `{name}` not found")))?;
    let mut v = adapter_json(newest);
    v["versions"] = versions.iter().map(adapter_json).collect();
    // A trained adapter's lineage: the job's method, hyperparameters and dataset hash.
    if let Some(job_id) = &newest.job_id {
        if let Ok(Some(job)) = crate::store::jobs::get(&state.db, &tenant, job_id).await {
            let spec: Option<crate::jobs::JobSpec> = serde_json::from_str(&job.request).ok();
            v["lineage"] = json!({
                "job_id": job.id,
                "method": job.method,
                "hyperparameters": spec.map(|s| s.hyperparameters),
                "dataset_sha256": job.dataset_sha256,
                "training_file": job.training_file,
            });
        }
    }
    Ok(Json(v))
}

async fn remove(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.adapters.delete(&tenant, &name).await?;
    Ok(Json(json!({"name": name, "deleted": true})))
}
