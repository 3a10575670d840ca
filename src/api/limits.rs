//! Per-tenant limits and time bounds enforced in the API layer:
//! - how many generation requests one tenant may have in progress at once
//!   (`limits.max_concurrent_per_tenant`): the [`concurrency`] middleware takes a permit from
//!   the tenant's semaphore before the handler runs and holds it until the response body ends,
//!   so a stream counts until its last event is sent, its client goes away, or
//!   `server.stream_timeout_seconds` pass;
//! - tokens per minute per tenant ([`token_rate`], charged by `generation::submit`);
//! - how many of one tenant's requests may wait in the shared engine queue
//!   (`limits.max_queued_per_tenant`): a [`QueuedTicket`] rides with the request and the
//!   engine drops it when the request starts running or goes away;
//! - the longest prompt (`limits.max_prompt_tokens`, checked by `generation::check_lengths`);
//! - the file storage quota (`limits.max_files_per_tenant`, `limits.max_file_bytes_per_tenant`,
//!   enforced by the insert itself);
//! - request and stream timeouts and the shutdown cut ([`deadline`]).
//!
//! Over a cap: 429 with `Retry-After`, naming the setting.

pub mod deadline;
pub mod token_rate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::HttpBody;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::Tenant;
use super::ApiError;
use crate::config::Settings;
pub use deadline::{request_timeout, Cut};
use token_rate::TokenRate;

/// One semaphore per tenant, created on the tenant's first request. The map holds one entry per
/// tenant that has called (tenants are created by the operator, so it stays small).
pub struct TenantLimits {
    max_concurrent: usize,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    max_queued: usize,
    queued: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    pub file_quota: crate::store::files::Quota,
    tokens: TokenRate,
    /// `limits.max_prompt_tokens`; `None` leaves the model's context as the only bound.
    pub max_prompt_tokens: Option<usize>,
    pub request_timeout: Duration,
    pub stream_timeout: Duration,
    /// Ends every request still in flight when the shutdown grace period is over.
    pub cut: Cut,
}

impl TenantLimits {
    /// Only the concurrency cap; the other limits off and timeouts of a day (for tests).
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            max_concurrent: max_concurrent.clamp(1, Semaphore::MAX_PERMITS),
            slots: Mutex::new(HashMap::new()),
            max_queued: usize::MAX,
            queued: Mutex::new(HashMap::new()),
            file_quota: crate::store::files::Quota {
                max_files: i64::MAX,
                max_bytes: i64::MAX,
            },
            tokens: TokenRate::new(0),
            max_prompt_tokens: None,
            request_timeout: Duration::from_secs(86_400),
            stream_timeout: Duration::from_secs(86_400),
            cut: Cut::default(),
        }
    }

    /// Every limit from the settings (`[limits]` and the `[server]` timeouts).
    pub fn from_settings(s: &Settings) -> Self {
        let mut l = Self::new(s.limits.max_concurrent_per_tenant);
        l.tokens = TokenRate::new(s.limits.tokens_per_minute);
        l.max_queued = s.limits.max_queued_per_tenant.max(1);
        l.file_quota = crate::store::files::Quota {
            max_files: i64::try_from(s.limits.max_files_per_tenant).unwrap_or(i64::MAX),
            max_bytes: i64::try_from(s.limits.max_file_bytes_per_tenant).unwrap_or(i64::MAX),
        };
        l.max_prompt_tokens =
            (s.limits.max_prompt_tokens > 0).then_some(s.limits.max_prompt_tokens);
        l.request_timeout = Duration::from_secs(s.server.request_timeout_seconds);
        l.stream_timeout = Duration::from_secs(s.server.stream_timeout_seconds);
        l
    }

    /// Whether generation requests are charged against `limits.tokens_per_minute`.
    pub fn token_rate_enabled(&self) -> bool {
        self.tokens.enabled()
    }

    /// Reserves `tokens` (prompt + max_new_tokens) for `tenant`, or the 429 to answer.
    pub fn charge_tokens(&self, tenant: &str, tokens: usize) -> Result<(), ApiError> {
        self.tokens
            .charge(tenant, tokens, Instant::now())
            .map_err(|retry_after| {
                ApiError::limit_exceeded(
                    format!(
                        "tenant `{tenant}` has used its tokens for now, the limit set by \
                         limits.tokens_per_minute; retry in {retry_after} s"
                    ),
                    retry_after,
                )
            })
    }

    /// Gives back reserved tokens a request did not generate.
    pub fn refund_tokens(&self, tenant: &str, tokens: usize) {
        self.tokens.refund(tenant, tokens);
    }

    /// `limits.max_queued_per_tenant`: also the most sequences one request may submit at once.
    pub fn max_queued(&self) -> usize {
        self.max_queued
    }

    /// A place in the engine queue for one of `tenant`'s requests, or the 429 to answer. The
    /// place is given back when the ticket is dropped (the engine drops it on admission).
    pub fn try_queue(&self, tenant: &str) -> Result<QueuedTicket, ApiError> {
        let count = {
            let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
            queued.entry(tenant.to_owned()).or_default().clone()
        };
        let before = count.fetch_add(1, Ordering::SeqCst);
        let ticket = QueuedTicket(count);
        if before >= self.max_queued {
            return Err(ApiError::limit_exceeded(
                format!(
                    "tenant `{tenant}` already has {} generation requests waiting in the queue, \
                     the limit set by limits.max_queued_per_tenant; retry shortly",
                    self.max_queued
                ),
                1,
            ));
        }
        Ok(ticket)
    }

    /// A generation slot for `tenant`, or the 429 to answer.
    pub fn try_acquire(&self, tenant: &str) -> Result<OwnedSemaphorePermit, ApiError> {
        let sem = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots
                .entry(tenant.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.max_concurrent)))
                .clone()
        };
        sem.try_acquire_owned().map_err(|_| {
            ApiError::limit_exceeded(
                format!(
                    "tenant `{tenant}` already has {} generation requests in progress, the \
                     limit set by limits.max_concurrent_per_tenant; retry when one finishes",
                    self.max_concurrent
                ),
                1,
            )
        })
    }
}

/// One of a tenant's requests waiting in the engine queue; dropping it frees the place.
#[derive(Debug)]
pub struct QueuedTicket(Arc<AtomicUsize>);

impl Drop for QueuedTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Middleware for the generation routes: one permit per request, released when the response
/// body has been sent (or dropped).
pub async fn concurrency(
    State(limits): State<Arc<TenantLimits>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(Tenant(tenant)) = req.extensions().get::<Tenant>().cloned() else {
        return ApiError::internal("generation route reached without a tenant").into_response();
    };
    let permit = match limits.try_acquire(&tenant) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let resp = next.run(req).await;
    hold_until_body_ends(resp, permit, &limits)
}

/// A body of known length is complete already (the handler collected the whole generation), so
/// the permit is released now; a stream carries the permit until it ends, is dropped, or runs
/// out of time.
fn hold_until_body_ends(
    resp: Response,
    permit: OwnedSemaphorePermit,
    limits: &TenantLimits,
) -> Response {
    if resp.body().size_hint().exact().is_some() {
        return resp;
    }
    deadline::guard_stream(
        resp,
        Some(permit),
        limits.stream_timeout,
        limits.cut.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tenant_has_its_own_cap_and_a_released_permit_frees_a_slot() {
        let limits = TenantLimits::new(2);
        let a1 = limits.try_acquire("a").unwrap();
        let _a2 = limits.try_acquire("a").unwrap();
        let e = limits.try_acquire("a").unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (429, "limit_exceeded"));
        assert_eq!(e.retry_after, Some(1));
        assert!(e.message.contains("limits.max_concurrent_per_tenant"));
        let _b = limits
            .try_acquire("b")
            .expect("another tenant is not affected");
        drop(a1);
        let _a3 = limits
            .try_acquire("a")
            .expect("a released permit frees a slot");
    }

    #[test]
    fn queued_tickets_are_counted_per_tenant_and_freed_when_dropped() {
        let mut limits = TenantLimits::new(8);
        limits.max_queued = 2;
        let a1 = limits.try_queue("a").unwrap();
        let _a2 = limits.try_queue("a").unwrap();
        let e = limits.try_queue("a").unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (429, "limit_exceeded"));
        assert!(
            e.message.contains("limits.max_queued_per_tenant"),
            "{}",
            e.message
        );
        // The refused attempt did not keep a place.
        let _b = limits
            .try_queue("b")
            .expect("another tenant is not affected");
        drop(a1);
        let _a3 = limits
            .try_queue("a")
            .expect("a dropped ticket frees a place");
        assert!(limits.try_queue("a").is_err());
    }

    #[tokio::test]
    async fn a_streamed_body_holds_its_permit_until_dropped() {
        use axum::body::Body;
        let limits = TenantLimits::new(1);
        let sem = Arc::new(Semaphore::new(1));
        let permit = sem.clone().try_acquire_owned().unwrap();
        let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>("x")]);
        let resp = hold_until_body_ends(Response::new(Body::from_stream(stream)), permit, &limits);
        assert_eq!(sem.available_permits(), 0);
        drop(resp);
        // The permit is given back by a task that sees the body go.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(sem.available_permits(), 1);

        let permit = sem.clone().try_acquire_owned().unwrap();
        let resp = hold_until_body_ends(Response::new(Body::from("done")), permit, &limits);
        assert_eq!(
            sem.available_permits(),
            1,
            "a complete body releases at once"
        );
        drop(resp);
    }
}
