//! Per-tenant limits enforced in the API layer. Today: how many generation requests one tenant
//! may have in progress at once (`limits.max_concurrent_per_tenant`). The [`concurrency`]
//! middleware takes a permit from the tenant's semaphore before the handler runs and holds it
//! until the response body ends, so a stream counts until its last event is sent or its client
//! goes away. Over the cap: 429 with `Retry-After`, naming the setting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::Tenant;
use super::ApiError;

/// One semaphore per tenant, created on the tenant's first request. The map holds one entry per
/// tenant that has called (tenants are created by the operator, so it stays small).
pub struct TenantLimits {
    max_concurrent: usize,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl TenantLimits {
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            max_concurrent: max_concurrent.clamp(1, Semaphore::MAX_PERMITS),
            slots: Mutex::new(HashMap::new()),
        }
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
    hold_until_body_ends(next.run(req).await, permit)
}

/// A body of known length is complete already (the handler collected the whole generation), so
/// the permit is released now; a stream carries the permit until it ends or is dropped.
fn hold_until_body_ends(resp: Response, permit: OwnedSemaphorePermit) -> Response {
    if resp.body().size_hint().exact().is_some() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let held = body.into_data_stream().map(move |chunk| {
        let _slot = &permit;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(held))
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

    #[tokio::test]
    async fn a_streamed_body_holds_its_permit_until_dropped() {
        let sem = Arc::new(Semaphore::new(1));
        let permit = sem.clone().try_acquire_owned().unwrap();
        let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>("x")]);
        let resp = hold_until_body_ends(Response::new(Body::from_stream(stream)), permit);
        assert_eq!(sem.available_permits(), 0);
        drop(resp);
        assert_eq!(sem.available_permits(), 1);

        let permit = sem.clone().try_acquire_owned().unwrap();
        let resp = hold_until_body_ends(Response::new(Body::from("done")), permit);
        assert_eq!(
            sem.available_permits(),
            1,
            "a complete body releases at once"
        );
        drop(resp);
    }
}
