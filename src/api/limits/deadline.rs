//! Time bounds, so a slow or idle client cannot hold a slot forever, and the cut at shutdown.
//!
//! - [`request_timeout`] (middleware on every route): from a request's headers to its
//!   response's headers — reading the body and a non-streamed generation included — at most
//!   `server.request_timeout_seconds`, else 408 `request_timeout`. Dropping the handler drops
//!   its engine receiver, which frees the engine slot at the next step.
//! - [`guard_stream`]: a streamed body ends after `server.stream_timeout_seconds` with a last
//!   `error` event (`stream_timeout`); its tenant slot is freed at that moment even when the
//!   client has stopped reading and the body is no longer polled.
//! - [`Cut`]: at the end of the shutdown grace period every request still in flight is ended
//!   the same way (503 `shutting_down`, or the `error` event on a stream), so the server can
//!   close its connections cleanly and exit.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit};

use super::TenantLimits;
use crate::api::ApiError;

/// The shutdown cut: `cut()` ends every request still in flight.
#[derive(Clone)]
pub struct Cut(Arc<watch::Sender<bool>>);

impl Default for Cut {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl Cut {
    pub fn cut(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once `cut()` has been called (at once if it was already).
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        // Err only if the sender is gone, and this struct holds it.
        let _ = rx.wait_for(|cut| *cut).await;
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the server is shutting down and ended this request; retry against a running server",
    )
}

/// Middleware: 408 once `server.request_timeout_seconds` pass before the response is ready;
/// 503 `shutting_down` when the shutdown grace period ends first.
pub async fn request_timeout(
    State(limits): State<Arc<TenantLimits>>,
    req: Request,
    next: Next,
) -> Response {
    let limit = limits.request_timeout;
    tokio::select! {
        resp = next.run(req) => resp,
        _ = tokio::time::sleep(limit) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request took longer than server.request_timeout_seconds = {}",
                limit.as_secs()
            ),
        )
        .into_response(),
        _ = limits.cut.wait() => shutting_down().into_response(),
    }
}

/// One SSE `error` event, the way generation streams report errors.
fn error_event(e: &ApiError) -> Bytes {
    Bytes::from(format!("event: error\ndata: {}\n\n", e.to_json()))
}

/// A tenant slot held by a streamed body: given back when this is dropped (the body ended or
/// went away), or by a timer task at the stream's deadline if that comes first.
struct Held {
    permit: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    /// Dropped with this; tells the timer task to stop waiting.
    _alive: oneshot::Sender<()>,
}

impl Held {
    fn new(permit: Option<OwnedSemaphorePermit>, limit: Duration) -> Self {
        let permit = Arc::new(Mutex::new(permit));
        let (alive, gone) = oneshot::channel::<()>();
        let timer = permit.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = gone => {}
                _ = tokio::time::sleep(limit) => release(&timer),
            }
        });
        Self {
            permit,
            _alive: alive,
        }
    }
}

fn release(permit: &Mutex<Option<OwnedSemaphorePermit>>) {
    permit.lock().unwrap_or_else(PoisonError::into_inner).take();
}

impl Drop for Held {
    fn drop(&mut self) {
        release(&self.permit);
    }
}

/// Wraps a streamed body: it ends after `limit` or at the shutdown cut with a last `error`
/// event, and `permit` (a generation slot; `None` for streams that hold none, such as a job's
/// events) is released when the body ends, is dropped, or `limit` passes — whichever comes
/// first, even if the body is never polled again.
pub fn guard_stream(
    resp: Response,
    permit: Option<OwnedSemaphorePermit>,
    limit: Duration,
    cut: Cut,
) -> Response {
    let alive = Held::new(permit, limit);
    let (parts, body) = resp.into_parts();
    let deadline = Box::pin(tokio::time::sleep(limit));
    let state = (body.into_data_stream(), deadline, cut, alive, false);
    let guarded = futures::stream::unfold(
        state,
        move |(mut inner, mut deadline, cut, alive, ended)| async move {
            if ended {
                return None;
            }
            let last = tokio::select! {
                biased;
                chunk = inner.next() => {
                    return chunk.map(|c| (c, (inner, deadline, cut, alive, false)));
                }
                _ = deadline.as_mut() => ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "stream_timeout",
                    format!(
                        "the stream ran longer than server.stream_timeout_seconds = {}",
                        limit.as_secs()
                    ),
                ),
                _ = cut.wait() => shutting_down(),
            };
            Some((Ok(error_event(&last)), (inner, deadline, cut, alive, true)))
        },
    );
    Response::from_parts(parts, Body::from_stream(guarded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    fn endless() -> Response {
        let s = futures::stream::unfold(0u64, |n| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((
                Ok::<_, std::io::Error>(Bytes::from(format!("data: {n}\n\n"))),
                n + 1,
            ))
        });
        Response::new(Body::from_stream(s))
    }

    async fn read_all(resp: Response) -> String {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_stream_past_its_limit_ends_with_an_error_event_and_frees_its_slot() {
        let sem = Arc::new(Semaphore::new(1));
        let permit = sem.clone().try_acquire_owned().unwrap();
        let resp = guard_stream(
            endless(),
            Some(permit),
            Duration::from_millis(100),
            Cut::default(),
        );
        let text = read_all(resp).await;
        assert!(text.starts_with("data: 0\n\n"), "{text}");
        assert!(
            text.ends_with("\n\n")
                && text.contains("event: error")
                && text.contains("stream_timeout"),
            "{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(sem.available_permits(), 1);
    }

    #[tokio::test]
    async fn an_unread_stream_gives_its_slot_back_at_the_deadline() {
        let sem = Arc::new(Semaphore::new(1));
        let permit = sem.clone().try_acquire_owned().unwrap();
        let resp = guard_stream(
            endless(),
            Some(permit),
            Duration::from_millis(50),
            Cut::default(),
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(sem.available_permits(), 1, "freed though never polled");
        drop(resp);
    }

    #[tokio::test]
    async fn the_shutdown_cut_ends_a_stream_cleanly() {
        let sem = Arc::new(Semaphore::new(1));
        let permit = sem.clone().try_acquire_owned().unwrap();
        let cut = Cut::default();
        let resp = guard_stream(
            endless(),
            Some(permit),
            Duration::from_secs(60),
            cut.clone(),
        );
        let reader = tokio::spawn(read_all(resp));
        tokio::time::sleep(Duration::from_millis(50)).await;
        cut.cut();
        let text = reader.await.unwrap();
        assert!(text.contains("shutting_down"), "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(sem.available_permits(), 1);
    }
}
