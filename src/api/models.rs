//! `GET /v1/models`: the served base model, in OpenAI's list shape.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/models", get(list))
}

async fn list(State(state): State<AppState>) -> Json<Value> {
    let m = &state.model;
    Json(json!({
        "object": "list",
        "data": [{
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "adapterd",
            "parent": null,
            "max_model_len": m.context_len,
        }],
    }))
}
