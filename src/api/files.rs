//! `/v1/files`: OpenAI-style training file uploads (multipart `file` + `purpose=fine-tune`),
//! listed, shown, downloaded and deleted per tenant. An upload is checked for shape only —
//! size, UTF-8, one JSON object per non-blank line, the record limit — because what a record
//! must contain depends on the method of the job that later names the file (`training_file`).

use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Tenant;
use super::{ApiError, AppState};
use crate::engine::train::data::{validate_jsonl, DatasetError, DatasetLimits};
use crate::store::files::{self as q, FileRow};

/// The only purpose accepted, as OpenAI names it.
const PURPOSE: &str = "fine-tune";
/// Room in the multipart body beyond the file itself: part headers, boundaries, `purpose`.
const MULTIPART_OVERHEAD: usize = 64 << 10;
/// Longest accepted client file name (it is only displayed).
const MAX_FILENAME_BYTES: usize = 255;

/// The routes; the upload's body limit follows `datasets.max_file_bytes`.
pub fn routes(max_file_bytes: usize) -> Router<AppState> {
    Router::new()
        .route(
            "/v1/files",
            get(list).post(upload).layer(DefaultBodyLimit::max(
                max_file_bytes.saturating_add(MULTIPART_OVERHEAD),
            )),
        )
        .route("/v1/files/{id}", get(show).delete(remove))
        .route("/v1/files/{id}/content", get(content))
}

/// A dataset that fails validation: 422 naming the line and field.
impl From<DatasetError> for ApiError {
    fn from(e: DatasetError) -> Self {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_dataset",
            e.to_string(),
        )
    }
}

/// The file object of the API (OpenAI's, plus `records`).
pub fn file_json(row: &FileRow) -> Value {
    json!({
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "filename": row.filename,
        "purpose": row.purpose,
        "records": row.records,
        "status": "processed",
    })
}

fn not_found(id: &str) -> ApiError {
    let shown: String = id.chars().take(80).collect();
    ApiError::not_found(format!("file `{shown}` not found"))
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the file exceeds datasets.max_file_bytes = {max} bytes"),
    )
}

fn multipart_error(e: MultipartError, max: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(max)
    } else {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    }
}

/// Reads the file part chunk by chunk, stopping as soon as it passes `max` bytes.
async fn read_capped(mut field: Field<'_>, max: usize) -> Result<Vec<u8>, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, max))? {
        if buf.len().saturating_add(chunk.len()) > max {
            return Err(too_large(max));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

async fn upload(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut form = form.map_err(|e| {
        ApiError::bad_request(format!(
            "send a multipart/form-data body with `file` and `purpose`: {}",
            e.body_text()
        ))
    })?;
    let limits = DatasetLimits {
        max_records: state.datasets.max_records,
        max_bytes: state.datasets.max_file_bytes,
    };
    let (mut purpose, mut file) = (None, None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limits.max_bytes))?
    {
        let key: String = field.name().unwrap_or_default().chars().take(64).collect();
        match key.as_str() {
            "purpose" if purpose.is_none() => {
                purpose = Some(
                    field
                        .text()
                        .await
                        .map_err(|e| multipart_error(e, limits.max_bytes))?,
                )
            }
            "file" if file.is_none() => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_owned();
                file = Some((name, read_capped(field, limits.max_bytes).await?));
            }
            "purpose" | "file" => {
                return Err(ApiError::invalid_field(format!(
                    "`{key}` was sent more than once"
                )))
            }
            _ => {
                return Err(ApiError::invalid_field(format!(
                    "unexpected part `{key}`; send `file` (JSONL) and `purpose`"
                )))
            }
        }
    }
    match purpose.as_deref() {
        Some(PURPOSE) => {}
        Some(other) => {
            let shown: String = other.chars().take(64).collect();
            return Err(ApiError::invalid_field(format!(
                "`purpose` must be \"{PURPOSE}\" (got {shown:?})"
            )));
        }
        None => {
            return Err(ApiError::invalid_field(format!(
                "the `purpose` part is missing; send purpose={PURPOSE}"
            )))
        }
    }
    let (filename, bytes) =
        file.ok_or_else(|| ApiError::invalid_field("the `file` part is missing"))?;
    if filename.len() > MAX_FILENAME_BYTES {
        return Err(ApiError::invalid_field(format!(
            "the file name is longer than {MAX_FILENAME_BYTES} bytes"
        )));
    }
    let records = validate_jsonl(&bytes, &limits)?;
    let row = FileRow {
        id: format!("file-{}", uuid::Uuid::new_v4().simple()),
        tenant: tenant.clone(),
        filename,
        purpose: PURPOSE.to_owned(),
        bytes: i64::try_from(bytes.len()).map_err(ApiError::internal)?,
        records: i64::try_from(records).map_err(ApiError::internal)?,
        created_at: i64::try_from(super::generation::unix_now()).map_err(ApiError::internal)?,
    };
    let quota = state.limits.file_quota;
    let stored = q::insert(&state.db, &row, &bytes, quota)
        .await
        .map_err(ApiError::internal)?;
    if !stored {
        return Err(ApiError::quota_exceeded(format!(
            "tenant `{tenant}` keeps as many files as its quota allows: at most {} files \
             (limits.max_files_per_tenant) and {} bytes (limits.max_file_bytes_per_tenant); \
             delete some first",
            quota.max_files, quota.max_bytes
        )));
    }
    Ok((StatusCode::OK, Json(file_json(&row))).into_response())
}

async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
) -> Result<Json<Value>, ApiError> {
    let rows = q::list(&state.db, &tenant)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        json!({"object": "list", "data": rows.iter().map(file_json).collect::<Vec<_>>()}),
    ))
}

async fn show(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = q::get(&state.db, &tenant, &id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(file_json(&row)))
}

async fn content(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = q::content(&state.db, &tenant, &id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| not_found(&id))?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], bytes).into_response())
}

async fn remove(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !q::delete(&state.db, &tenant, &id)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(not_found(&id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}
