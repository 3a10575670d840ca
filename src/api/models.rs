//! `GET /v1/models` and `GET /v1/models/{id}`: the served base model and the caller's adapters
//! (never another tenant's), in OpenAI's shapes.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::Tenant;
use super::{ApiError, AppState};
use crate::adapters::AdapterError;
use crate::store::adapters::AdapterRow;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list))
        .route("/v1/models/{id}", get(retrieve))
}

fn base_model(state: &AppState) -> Value {
    let m = &state.model;
    json!({
        "id": m.name,
        "object": "model",
        "created": m.created,
        "owned_by": "adapterd",
        "parent": null,
        "max_model_len": m.context_len,
    })
}

/// The base model, then the caller's adapters (newest version of each) with `parent` set to
/// the base; `model` in a request may name either.
async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
) -> Result<Json<Value>, ApiError> {
    let mut data = vec![base_model(&state)];
    for row in state.adapters.list(&tenant).await? {
        data.push(adapter_model(&state, &row.name, &row));
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

fn adapter_model(state: &AppState, id: &str, row: &AdapterRow) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": created_unix(&row.created_at),
        "owned_by": row.tenant,
        "parent": state.model.name,
        "version": row.version,
    })
}

/// Unix seconds of an RFC 3339 UTC timestamp written by the registry (0 if unparsable).
fn created_unix(ts: &str) -> i64 {
    let p = |a: usize, b: usize| ts.get(a..b).and_then(|s| s.parse::<i64>().ok());
    let (Some(y), Some(m), Some(d), Some(hh), Some(mm), Some(ss)) =
        (p(0, 4), p(5, 7), p(8, 10), p(11, 13), p(14, 16), p(17, 19))
    else {
        return 0;
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + hh * 3600 + mm * 60 + ss
}

/// The base model, or one of the caller's adapters by `name` or `name@version`.
async fn retrieve(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id == state.model.name {
        return Ok(Json(base_model(&state)));
    }
    match state.adapters.find(&tenant, &id).await {
        Ok(row) => Ok(Json(adapter_model(&state, &id, &row))),
        Err(AdapterError::NotFound(_) | AdapterError::InvalidName(_)) => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model `{id}` does not exist"),
        )),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_convert_to_unix_seconds() {
        // python3 -c "import calendar,time;print(calendar.timegm(time.strptime('2026-11-27T04:30:00Z','%Y-%m-%dT%H:%M:%SZ')))"
        assert_eq!(super::created_unix("2026-11-27T04:30:00Z"), 1795753800);
        assert_eq!(super::created_unix("1970-01-01T00:00:00Z"), 0);
        assert_eq!(super::created_unix("garbage"), 0);
    }
}
