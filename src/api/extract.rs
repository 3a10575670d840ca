//! `ApiJson<T>`: a JSON body extractor whose failures use the error envelope — 400 for bytes that
//! are not JSON, 422 naming the field for JSON of the wrong shape, 413 past the body limit.
//! The body is parsed whatever its Content-Type, so `curl -d` works without a header.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::ApiError;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body exceeds this route's limit (server.max_body_bytes; \
                     POST /v1/finetune: 2 × datasets.max_file_bytes + 1 MiB)",
                )
            } else {
                ApiError::bad_request(format!("could not read the request body: {rej}"))
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses `bytes` as `T`, mapping errors as the extractor does.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let msg = if path.is_empty() || path == "." {
                    inner.to_string()
                } else {
                    format!("field `{path}`: {inner}")
                };
                ApiError::invalid_field(msg)
            }
            _ => ApiError::bad_request(format!("malformed JSON: {inner}")),
        }
    })
}
