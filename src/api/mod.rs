//! HTTP surface: one router per resource, composed in [`router`]. Handlers validate input into
//! engine types (`GenerateRequest`) and never touch tensors; every error is an [`ApiError`].
//! Every request passes [`auth::authenticate`], which attaches the caller's [`auth::Tenant`];
//! generation routes also pass the per-tenant concurrency cap in [`limits`].

pub mod adapters;
pub mod auth;
pub mod chinchilla;
pub mod error;
pub mod extract;
pub mod files;
pub mod finetune;
pub mod generate;
pub mod generation;
pub mod health;
pub mod limits;
pub mod messages;
pub mod models;
pub mod openai;
pub mod tokenize;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::adapters::AdapterRegistry;
use crate::engine::scheduler::EngineHandle;
use crate::engine::tokenizer::Tokenizer;
pub use error::ApiError;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub model: Arc<ServedModel>,
    pub metrics: PrometheusHandle,
    pub adapters: Arc<AdapterRegistry>,
    pub db: sqlx::SqlitePool,
    pub datasets: crate::config::DatasetSettings,
    pub finetune: crate::config::FinetuneSettings,
    pub jobs: Arc<crate::jobs::JobRunner>,
    pub auth: Arc<auth::Auth>,
    pub limits: Arc<limits::TenantLimits>,
}

/// Facts about the served base model that requests are validated against.
#[derive(Clone, Debug)]
pub struct ServedModel {
    /// The name clients use in `model` and see in `/v1/models`.
    pub name: String,
    /// Context length in tokens (prompt + generated).
    pub context_len: usize,
    pub default_max_new_tokens: usize,
    pub max_new_tokens_limit: usize,
    /// Unix seconds when the model was loaded (`created` in /v1/models).
    pub created: u64,
    /// Where the model runs (`cpu`, `cuda:0`; `/ready`).
    pub device: String,
    /// Which forward runs it: `native` (adapterd's CPU kernels) or `portable` (candle's ops).
    pub kernels: &'static str,
}

/// The API. `with_metrics`: also serve `/metrics` (false when it has its own listener,
/// [`metrics_router`]).
pub fn router(
    state: AppState,
    max_body_bytes: usize,
    max_upload_bytes: usize,
    with_metrics: bool,
) -> Router {
    let generation = Router::new()
        .merge(generate::routes())
        .merge(openai::routes())
        .route_layer(middleware::from_fn_with_state(
            state.limits.clone(),
            limits::concurrency,
        ));
    Router::new()
        .merge(adapters::routes(max_upload_bytes))
        .merge(files::routes(state.datasets.max_file_bytes))
        .merge(finetune::routes(state.datasets.max_file_bytes))
        .merge(generation)
        .merge(tokenize::routes())
        .merge(models::routes())
        .merge(health::routes())
        .merge(if with_metrics {
            health::metrics_routes()
        } else {
            Router::new()
        })
        .merge(chinchilla::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.auth.clone(),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            state.limits.clone(),
            limits::request_timeout,
        ))
        .layer(middleware::from_fn(error::ensure_envelope))
        .layer(middleware::from_fn(record_http_metrics))
        .with_state(state)
}

/// `/metrics` alone, for `server.metrics_bind`: a scraper's port that serves nothing else.
pub fn metrics_router(state: AppState) -> Router {
    health::metrics_routes()
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// What the port serves while the server starts (database, model, engine): `/health` answers
/// that the process is alive, every other route 503 with Retry-After. Each response closes its
/// connection, so a client's next request reaches the full API once it has taken over.
pub fn starting_router() -> Router {
    Router::new()
        .merge(health::starting_routes())
        .fallback(|| async {
            ApiError::unavailable("the server is starting: the model is loading")
        })
        .layer(middleware::map_response(|mut resp: Response| async move {
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            resp
        }))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// The method as a metric label: hyper accepts any token as a method, and the metric is
/// recorded before authentication, so anything outside the standard set counts as "other".
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// HTTP metrics labelled by the matched route pattern (never the raw URI, so labels stay bounded).
async fn record_http_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(req.method());
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    ::metrics::counter!(crate::metrics::HTTP_REQUESTS_TOTAL, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    ::metrics::histogram!(crate::metrics::HTTP_REQUEST_DURATION_SECONDS, "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}
