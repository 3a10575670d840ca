//! `/v1/finetune`: submit SFT/DPO jobs (202), list, show, follow events (JSON pages or SSE),
//! cancel. A submission is validated completely before anything is stored — hyperparameters,
//! the adapter name, and every dataset record (parsed and tokenized, 422 naming the line and
//! field) — and the job keeps its own copy of the data, so deleting a file later strands
//! nothing. Every read is scoped by tenant: another tenant's job id answers 404 like a missing one.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Tenant;
use super::extract::ApiJson;
use super::limits::deadline::guard_stream;
use super::{ApiError, AppState};
use crate::adapters::{now_rfc3339, validate_name};
use crate::engine::train::data::{DatasetLimits, Method};
use crate::engine::train::hyper::{HyperLimits, HyperRequest};
use crate::jobs::{dataset_sha256, prepare_examples, JobSpec};
use crate::store::jobs::{self as q, EventRow, JobRow, TERMINAL};

/// Room beyond the dataset itself in a submission body (hyperparameters, JSON framing).
const BODY_OVERHEAD: usize = 1 << 20;

pub fn routes(max_dataset_bytes: usize) -> Router<AppState> {
    Router::new()
        .route(
            "/v1/finetune",
            get(list).post(submit).layer(DefaultBodyLimit::max(
                max_dataset_bytes
                    .saturating_mul(2)
                    .saturating_add(BODY_OVERHEAD),
            )),
        )
        .route("/v1/finetune/{id}", get(show))
        .route("/v1/finetune/{id}/events", get(events))
        .route("/v1/finetune/{id}/cancel", post(cancel))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitRequest {
    method: Method,
    adapter_name: String,
    #[serde(default)]
    training_data: Option<Vec<Value>>,
    #[serde(default)]
    training_file: Option<String>,
    #[serde(default)]
    hyperparameters: HyperRequest,
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "job_not_found",
        format!(
            "fine-tuning job `{}` not found",
            id.chars().take(80).collect::<String>()
        ),
    )
}

/// The job object of the API.
pub fn job_json(row: &JobRow) -> Value {
    let spec: Option<JobSpec> = serde_json::from_str(&row.request).ok();
    let metrics: Value = serde_json::from_str(&row.metrics).unwrap_or_else(|_| json!({}));
    let eta = if row.status == "running" {
        metrics.get("eta_seconds").cloned()
    } else {
        None
    };
    json!({
        "id": row.id,
        "object": "finetune.job",
        "method": row.method,
        "status": row.status,
        "adapter_name": row.adapter_name,
        "adapter_version": row.adapter_version,
        "adapter_id": row.adapter_version.map(|v| format!("{}@{v}", row.adapter_name)),
        "progress": {"step": row.step, "total_steps": row.total_steps},
        "metrics": metrics,
        "eta_seconds": eta,
        "hyperparameters": spec.map(|s| serde_json::to_value(s.hyperparameters).unwrap_or(Value::Null)),
        "training_file": row.training_file,
        "dataset_sha256": row.dataset_sha256,
        "error": row.error,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
    })
}

async fn submit(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiJson(req): ApiJson<SubmitRequest>,
) -> Result<Response, ApiError> {
    validate_name("adapter_name", &req.adapter_name).map_err(ApiError::from)?;
    let limits = HyperLimits {
        max_rank: state.adapters.limits().max_rank,
        max_seq_len: state.model.context_len,
        max_steps: state.finetune.max_steps,
    };
    let hyper = req
        .hyperparameters
        .resolve(req.method, &limits)
        .map_err(|e| ApiError::invalid_field(e.to_string()))?;
    let dataset_limits = DatasetLimits {
        max_records: state.datasets.max_records,
        max_bytes: state.datasets.max_file_bytes,
    };
    let (jsonl, inline) =
        match (req.training_data, &req.training_file) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_field(
                    "give either `training_data` or `training_file`, not both",
                ))
            }
            (None, None) => return Err(ApiError::invalid_field(
                "`training_data` (an array of records) or `training_file` (a file id) is required",
            )),
            (Some(values), None) => {
                let mut out = Vec::new();
                for v in &values {
                    // serde_json writes one line per value: no raw newlines survive in strings.
                    out.extend(serde_json::to_vec(v).map_err(ApiError::internal)?);
                    out.push(b'\n');
                }
                (out, true)
            }
            (None, Some(id)) => {
                let bytes = crate::store::files::content(&state.db, &tenant, id)
                    .await
                    .map_err(ApiError::internal)?
                    .ok_or_else(|| {
                        ApiError::invalid_field(format!(
                            "`training_file`: no file `{}`",
                            id.chars().take(80).collect::<String>()
                        ))
                    })?;
                (bytes, false)
            }
        };
    if jsonl.len() > dataset_limits.max_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the dataset exceeds datasets.max_file_bytes = {}",
                dataset_limits.max_bytes
            ),
        ));
    }
    // Validate every record now (tokenizing is the only way to know each fits), off the
    // async threads.
    // The dataset moves into the blocking task and back out: no copy of up to
    // datasets.max_file_bytes per submission.
    let (examples, jsonl) = {
        let (hyper, jobs) = (hyper.clone(), state.jobs.clone());
        tokio::task::spawn_blocking(move || {
            let r = prepare_examples(&jsonl, &hyper, jobs.tokenizer(), &dataset_limits);
            (r, jsonl)
        })
        .await
        .map_err(ApiError::internal)?
    };
    let examples = examples.map_err(|e| {
        let e = if inline {
            // Inline records are numbered by their index in `training_data`.
            crate::engine::train::data::DatasetError {
                field: if e.line > 0 {
                    format!(
                        "training_data[{}]{}{}",
                        e.line - 1,
                        if e.field.is_empty() { "" } else { "." },
                        e.field
                    )
                } else {
                    e.field
                },
                line: 0,
                message: e.message,
            }
        } else {
            e
        };
        ApiError::from(e)
    })?;
    let total_steps = hyper.total_steps(examples.len());
    if total_steps > state.finetune.max_steps {
        return Err(ApiError::invalid_field(format!(
            "`hyperparameters.epochs`: {} epochs of this dataset are {total_steps} steps, more than finetune.max_steps = {}",
            hyper.epochs, state.finetune.max_steps
        )));
    }
    let active = q::count_active(&state.db, &tenant)
        .await
        .map_err(ApiError::internal)?;
    if active >= state.finetune.max_active_per_tenant as i64 {
        return Err(ApiError::limit_exceeded(
            format!(
                "this tenant already has {active} queued or running jobs (finetune.max_active_per_tenant = {})",
                state.finetune.max_active_per_tenant
            ),
            30,
        ));
    }
    let spec = JobSpec {
        method: req.method,
        adapter_name: req.adapter_name.clone(),
        hyperparameters: hyper,
    };
    let row = JobRow {
        id: format!("ftjob-{}", uuid::Uuid::new_v4().simple()),
        tenant: tenant.clone(),
        method: match req.method {
            Method::Sft => "sft".into(),
            Method::Dpo => "dpo".into(),
        },
        status: "queued".into(),
        adapter_name: req.adapter_name,
        adapter_version: None,
        request: serde_json::to_string(&spec).map_err(ApiError::internal)?,
        step: 0,
        total_steps: total_steps as i64,
        metrics: "{}".into(),
        error: None,
        checkpoint_path: None,
        dataset_sha256: Some(dataset_sha256(&jsonl)),
        training_file: req.training_file,
        created_at: now_rfc3339(),
        started_at: None,
        finished_at: None,
    };
    q::insert(&state.db, &row, &jsonl)
        .await
        .map_err(ApiError::internal)?;
    let _ = q::add_event(
        &state.db,
        &row.id,
        &now_rfc3339(),
        "info",
        "message",
        &format!(
            "job queued: {} examples, {total_steps} steps",
            examples.len()
        ),
        None,
    )
    .await;
    state.jobs.wake();
    Ok((StatusCode::ACCEPTED, Json(job_json(&row))).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    limit: Option<i64>,
}

async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let rows = q::list(&state.db, &tenant, limit)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({
        "object": "list",
        "data": rows.iter().map(job_json).collect::<Vec<_>>(),
    })))
}

async fn find(state: &AppState, tenant: &str, id: &str) -> Result<JobRow, ApiError> {
    q::get(&state.db, tenant, id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| not_found(id))
}

async fn show(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(job_json(&find(&state, &tenant, &id).await?)))
}

async fn cancel(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let before = find(&state, &tenant, &id).await?;
    if TERMINAL.contains(&before.status.as_str()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            format!("job `{id}` already {}", before.status),
        ));
    }
    let row = q::cancel(&state.db, &tenant, &id, &now_rfc3339())
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| not_found(&id))?;
    state.jobs.request_cancel(&id);
    let _ = q::add_event(
        &state.db,
        &id,
        &now_rfc3339(),
        "info",
        "message",
        "cancellation requested",
        None,
    )
    .await;
    Ok(Json(job_json(&row)))
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
    #[serde(default)]
    stream: Option<bool>,
}

fn event_json(e: &EventRow) -> Value {
    json!({
        "id": e.id,
        "object": "finetune.event",
        "created_at": e.created_at,
        "level": e.level,
        "type": e.kind,
        "message": e.message,
        "data": e.data.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok()),
    })
}

async fn events(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    find(&state, &tenant, &id).await?;
    let after = query.after.unwrap_or(0);
    let limit = query.limit.unwrap_or(1000).clamp(1, 10_000);
    if !query.stream.unwrap_or(false) {
        let rows = q::events(&state.db, &id, after, limit)
            .await
            .map_err(ApiError::internal)?;
        return Ok(Json(json!({
            "object": "list",
            "data": rows.iter().map(event_json).collect::<Vec<_>>(),
            "has_more": rows.len() as i64 == limit,
        }))
        .into_response());
    }
    // SSE: every event as it is recorded; the stream ends after the job finishes and its last
    // events are sent.
    let db = state.db.clone();
    let init = (after, false, Vec::<EventRow>::new());
    let s = stream::unfold(init, move |(mut after, mut finished, mut pending)| {
        let (db, tenant, id) = (db.clone(), tenant.clone(), id.clone());
        async move {
            loop {
                if let Some(e) = (!pending.is_empty()).then(|| pending.remove(0)) {
                    after = e.id;
                    let ev = Event::default()
                        .event("finetune.event")
                        .data(event_json(&e).to_string());
                    return Some((Ok::<_, Infallible>(ev), (after, finished, pending)));
                }
                if finished {
                    return None;
                }
                let status = q::get(&db, &tenant, &id)
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.status);
                let done = status.as_deref().is_none_or(|s| TERMINAL.contains(&s));
                pending = q::events(&db, &id, after, 100).await.unwrap_or_default();
                if pending.is_empty() {
                    if done {
                        finished = true;
                        let ev = Event::default().event("done").data("[DONE]");
                        return Some((Ok(ev), (after, finished, pending)));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    });
    // Bounded like a generation stream (`server.stream_timeout_seconds`, the shutdown cut), but
    // holds no generation slot: watching a job is not generating.
    let resp = Sse::new(s).keep_alive(KeepAlive::default()).into_response();
    Ok(guard_stream(
        resp,
        None,
        state.limits.stream_timeout,
        state.limits.cut.clone(),
    ))
}
