//! Who is calling: the [`authenticate`] middleware runs on every route and attaches a
//! [`Tenant`] to the request; handlers take `Tenant(tenant): Tenant` as an argument.
//!
//! Auth off: every request is tenant `default`. Auth on: every route except the open ones
//! ([`OPEN_ROUTES`]: health, readiness, metrics and the stateless planner) needs
//! `Authorization: Bearer <key>`; the key's SHA-256 is looked up in the database on every
//! request (no cache, so a revoked key fails on its next request). The secret itself is never
//! compared with anything, so there is no comparison whose timing could leak it. Any failure is
//! a 401 with the error envelope and `WWW-Authenticate: Bearer`.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::SqlitePool;

use super::ApiError;
use crate::keys::hash_key;

/// Routes answered without a key even with auth on. `/v1/chinchilla` is pure arithmetic on the
/// query (no tenant data) and is what the open `/chinchilla` page calls.
pub const OPEN_ROUTES: &[&str] = &[
    "/health",
    "/ready",
    "/metrics",
    "/chinchilla",
    "/v1/chinchilla",
];

/// Longest `Authorization` value considered; real keys are 76 bytes.
const MAX_KEY_LEN: usize = 256;

/// The caller's tenant, set by [`authenticate`]. Use it as a handler argument; a handler on a
/// route the middleware left open (auth on) gets a 500, never the `default` tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Tenant>()
            .cloned()
            .ok_or_else(|| ApiError::internal("a handler asked for the tenant on an open route"))
    }
}

/// Whether keys are required, and where they are looked up.
pub struct Auth {
    pub enabled: bool,
    db: SqlitePool,
}

impl Auth {
    pub fn new(enabled: bool, db: SqlitePool) -> Self {
        Self { enabled, db }
    }

    /// The tenant of the key in `headers`, or the 401 to answer.
    pub async fn tenant_of(&self, headers: &HeaderMap) -> Result<Tenant, ApiError> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Err(ApiError::unauthorized(
                "missing_api_key",
                "this route needs an API key: send `Authorization: Bearer <key>` \
                 (keys come from `adapterd keys create`)",
            ));
        };
        if values.next().is_some() {
            return Err(malformed("send exactly one Authorization header"));
        }
        let key = bearer_token(value.as_bytes())?;
        match crate::store::keys::tenant_by_hash(&self.db, &hash_key(key)).await {
            Ok(Some(tenant)) => Ok(Tenant(tenant)),
            Ok(None) => Err(ApiError::unauthorized(
                "invalid_api_key",
                "the API key is not valid (unknown or revoked)",
            )),
            Err(e) => Err(ApiError::internal(format!("looking up an API key: {e}"))),
        }
    }
}

fn malformed(detail: &str) -> ApiError {
    ApiError::unauthorized(
        "invalid_api_key",
        format!("malformed Authorization header ({detail}); expected `Bearer <key>`"),
    )
}

/// The key of a `Bearer <key>` header value (scheme case-insensitive, RFC 7235).
fn bearer_token(value: &[u8]) -> Result<&str, ApiError> {
    if value.len() > MAX_KEY_LEN {
        return Err(malformed("too long"));
    }
    let text = std::str::from_utf8(value).map_err(|_| malformed("not ASCII"))?;
    let (scheme, key) = text
        .trim()
        .split_once(' ')
        .ok_or_else(|| malformed("no key after the scheme"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(malformed("the scheme must be Bearer"));
    }
    let key = key.trim();
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(malformed("the key must be one printable word"));
    }
    Ok(key)
}

/// Attaches the caller's [`Tenant`] to the request, or answers 401.
pub async fn authenticate(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    if !auth.enabled {
        req.extensions_mut()
            .insert(Tenant(crate::DEFAULT_TENANT.to_owned()));
        return next.run(req).await;
    }
    if OPEN_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    match auth.tenant_of(req.headers()).await {
        Ok(tenant) => {
            req.extensions_mut().insert(tenant);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn only_a_single_bearer_word_is_a_key() {
        assert_eq!(bearer_token(b"Bearer sk-1").unwrap(), "sk-1");
        assert_eq!(bearer_token(b"bearer  sk-1 ").unwrap(), "sk-1");
        for bad in [
            &b"Basic dXNlcjpwdw=="[..],
            b"Bearer",
            b"Bearer ",
            b"sk-1",
            b"Bearer a b",
            b"Bearer \xff",
            &[b'x'; 300][..],
        ] {
            let e = bearer_token(bad).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (401, "invalid_api_key"));
        }
    }
}
