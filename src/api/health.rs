//! Operations: `GET /health` (the process answers, from the moment the port is bound), `GET
//! /ready` (the model is loaded and the engine accepts work; 503 while starting) and `GET /metrics` (Prometheus text; on the API port, or alone on
//! `server.metrics_bind`).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
}

/// Start-up: alive, not ready (see [`super::starting_router`]).
pub fn starting_routes() -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(starting))
}

async fn starting() -> ApiError {
    ApiError::unavailable("not ready: the server is starting and the model is loading")
}

pub fn metrics_routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The app state exists only once the model has loaded, so reaching this handler means ready,
/// unless the engine thread has gone.
async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.engine.is_alive() {
        let m = &state.model;
        Ok(Json(json!({
            "status": "ready",
            "model": m.name,
            "device": m.device,
            "kernels": m.kernels,
        })))
    } else {
        Err(ApiError::unavailable("the engine has stopped"))
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
