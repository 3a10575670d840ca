//! `GET /v1/chinchilla` (the scaling-law plan as JSON) and `GET /chinchilla` (the interactive
//! page, `assets/chinchilla.html`, compiled into the binary). The query is parsed here, by
//! hand, so that every malformed value gets the API's error envelope; the formulas live in
//! [`crate::scaling`]. Stateless: the router works with any application state.

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};

use crate::api::ApiError;
use crate::scaling::{self, Fit, Plan, ScalingError};

/// The page, served as is; it asks `/v1/chinchilla` for every number it shows.
const PAGE: &str = include_str!("../../assets/chinchilla.html");

/// `GET /v1/chinchilla` and `GET /chinchilla`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/v1/chinchilla", get(plan_handler))
        .route("/chinchilla", get(page))
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE))
}

async fn plan_handler(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Plan>, ApiError> {
    let Query(pairs) =
        query.map_err(|e| ApiError::bad_request(format!("bad query string: {e}")))?;
    let q = PlanQuery::parse(&pairs)?;
    scaling::plan(q.flops, q.fit, q.inference_tokens)
        .map(Json)
        .map_err(from_scaling)
}

/// Every scaling error is a well-formed value the planner cannot accept: 422.
fn from_scaling(e: ScalingError) -> ApiError {
    ApiError::invalid_field(e.to_string())
}

/// The validated query of `GET /v1/chinchilla`.
#[derive(Debug, Clone, PartialEq)]
struct PlanQuery {
    flops: f64,
    fit: Fit,
    inference_tokens: Option<f64>,
}

impl PlanQuery {
    /// Missing `flops`, a value that is not a number, a repeated or unknown parameter: 400.
    /// A number the planner cannot use (NaN, ±inf, 1e400, ≤ 0, negative tokens), an unknown
    /// fit: 422. An empty `fit` or `inference_tokens` (an HTML form's blank field) is absent.
    fn parse(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        let (mut flops, mut fit, mut tokens) = (None, None, None);
        for (key, value) in pairs {
            let slot = match key.as_str() {
                "flops" => &mut flops,
                "fit" => &mut fit,
                "inference_tokens" => &mut tokens,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown query parameter `{other}`; expected flops, fit, inference_tokens"
                    )))
                }
            };
            if slot.replace(value.as_str()).is_some() {
                return Err(ApiError::bad_request(format!(
                    "query parameter `{key}` is given more than once"
                )));
            }
        }
        let flops = match flops {
            Some(v) if !v.is_empty() => number("flops", v)?,
            _ => {
                return Err(ApiError::bad_request(
                    "query parameter `flops` (the compute budget in FLOPs, e.g. flops=1e22) is required",
                ))
            }
        };
        let fit = match fit.filter(|v| !v.is_empty()) {
            Some(v) => v.parse::<Fit>().map_err(from_scaling)?,
            None => Fit::default(),
        };
        let inference_tokens = match tokens.filter(|v| !v.is_empty()) {
            Some(v) => Some(number("inference_tokens", v)?),
            None => None,
        };
        Ok(Self {
            flops,
            fit,
            inference_tokens,
        })
    }
}

/// Parses a decimal number; a literal too large for f64 (1e400) is refused as out of range
/// rather than silently becoming infinity. The range checks themselves are the planner's.
fn number(field: &str, text: &str) -> Result<f64, ApiError> {
    let x: f64 = text.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "query parameter `{field}` must be a number such as 1e22, got `{text}`"
        ))
    })?;
    let lower = text.to_ascii_lowercase();
    let spelled_special = lower.contains("inf") || lower.contains("nan");
    if x.is_infinite() && !spelled_special {
        return Err(ApiError::invalid_field(format!(
            "{field} = {text} overflows a 64-bit float; use a value below 1.8e308"
        )));
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &[(&str, &str)]) -> Result<PlanQuery, ApiError> {
        let pairs: Vec<(String, String)> = q
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PlanQuery::parse(&pairs)
    }

    #[test]
    fn query_defaults_to_hoffmann_without_inference() {
        let q = parse(&[("flops", "1e22")]).expect("ok");
        assert_eq!(
            q,
            PlanQuery {
                flops: 1e22,
                fit: Fit::Hoffmann2022,
                inference_tokens: None
            }
        );
        let q = parse(&[("flops", "1e22"), ("fit", ""), ("inference_tokens", "")]).expect("ok");
        assert_eq!(q.fit, Fit::Hoffmann2022);
        assert_eq!(q.inference_tokens, None);
    }

    #[test]
    fn query_errors_name_the_field_with_the_right_status() {
        type Query<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Query, u16, &str); 8] = [
            (&[], 400, "flops"),
            (&[("flops", "lots")], 400, "flops"),
            (&[("flops", "1e400")], 422, "flops"),
            (&[("flops", "1e22"), ("flops", "1e23")], 400, "flops"),
            (&[("flops", "1e22"), ("flop", "1")], 400, "flop"),
            (&[("flops", "1e22"), ("fit", "kaplan")], 422, "fit"),
            (
                &[("flops", "1e22"), ("inference_tokens", "x")],
                400,
                "inference_tokens",
            ),
            (
                &[("flops", "1e22"), ("inference_tokens", "1e999")],
                422,
                "inference_tokens",
            ),
        ];
        for (q, status, field) in cases {
            let e = parse(q).expect_err("must fail");
            assert_eq!(e.status.as_u16(), status, "{q:?}: {e}");
            assert!(e.message.contains(field), "{q:?}: {e}");
        }
    }
}
