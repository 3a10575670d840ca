//! `GET /v1/models`: the served base model, in OpenAI's list shape.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, AppState};

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

async fn list(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [base_model(&state)]}))
}

async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id == state.model.name {
        Ok(Json(base_model(&state)))
    } else {
        Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model `{id}` does not exist"),
        ))
    }
}
