//! The HTTP accept loop: hyper connections with a header/idle timer, drained on shutdown.
//!
//! `axum::serve` gives hyper no timer, so hyper's header-read timeout never fires there: a client
//! that trickles its request headers, or parks an idle keep-alive connection, holds a socket
//! forever. Here every HTTP/1 connection gets `server.header_timeout_seconds` to deliver each
//! request's headers — hyper starts that clock whenever it waits for a request head, so it also
//! closes keep-alive connections left idle that long. Bodies and streamed responses are bounded
//! separately by the request and stream timeouts (`api::limits::deadline`).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// After an accept error (typically out of file descriptors), wait this long before the next
/// accept instead of spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` and serves `router` on each until `shutdown` resolves;
/// then stops accepting (the caller still owns the listener: the start-up server hands it on to
/// the API), asks every open connection to finish its in-flight request and close
/// (idle ones close at once), and returns the handle whose `shutdown()` resolves when the last
/// one has closed.
pub async fn serve_until(
    listener: &TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> GracefulShutdown {
    // HTTP/1 only: hyper has no idle timeout for HTTP/2 connections, so a cleartext HTTP/2
    // client could park sockets forever; OpenAI-compatible clients speak HTTP/1.1.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Streamed tokens are small writes; Nagle's algorithm would hold each one back.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    graceful
}
