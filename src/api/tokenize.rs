//! `POST /v1/tokenize` and `POST /v1/detokenize`: the served model's tokenizer, exposed.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::ApiJson;
use super::{ApiError, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tokenize", post(tokenize))
        .route("/v1/detokenize", post(detokenize))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    text: String,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeBody {
    tokens: Vec<u32>,
    #[serde(default)]
    skip_special_tokens: bool,
}

async fn tokenize(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<TokenizeBody>,
) -> Result<Json<Value>, ApiError> {
    let ids = state
        .tokenizer
        .encode(&body.text, body.add_special_tokens)
        .map_err(|e| ApiError::invalid_field(format!("`text` could not be tokenized: {e}")))?;
    Ok(Json(json!({"tokens": ids, "count": ids.len()})))
}

async fn detokenize(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DetokenizeBody>,
) -> Result<Json<Value>, ApiError> {
    let vocab = state.tokenizer.vocab_size() as u32;
    if let Some(bad) = body.tokens.iter().find(|&&id| id >= vocab) {
        return Err(ApiError::invalid_field(format!(
            "`tokens`: id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let text = state
        .tokenizer
        .decode(&body.tokens, body.skip_special_tokens)
        .map_err(|e| ApiError::invalid_field(format!("`tokens` could not be decoded: {e}")))?;
    Ok(Json(json!({"text": text})))
}
