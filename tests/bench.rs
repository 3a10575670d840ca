//! The benchmark harness (`adapterd bench`) end to end against the real app serving the tiny
//! test model in this process: every scenario type runs and reports what it should, the run
//! report survives a JSON round trip into `bench compare` and the plot, and a server that is
//! down, refuses the request, or sends a malformed stream yields failed requests with reasons —
//! never a panic. Numbers are not asserted beyond "non-zero": timings belong in BENCHMARKS.md.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use adapterd::bench::{self, report::RunReport, scenario::Mode, RunArgs};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn args(extra: &[&str]) -> RunArgs {
    let mut argv = vec!["bench"];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).expect("flags parse").run
}

/// One request on one stream, base mode, `model` named so no `GET /v1/models` is needed, and
/// no warm-up: the request counted is the first the server sees.
fn one_request(url: &str, model: &str) -> RunArgs {
    args(&[
        "--url",
        url,
        "--modes",
        "base",
        "-c",
        "1",
        "--prompt-tokens",
        "8",
        "--min-requests",
        "1",
        "--model",
        model,
        "--no-warmup",
    ])
}

#[tokio::test]
async fn every_scenario_type_runs_against_adapterd_and_reports_tokens_rss_and_cold_pairs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = helpers::spawn_app_in(dir.path(), |_| {}).await;
    let model = dir.path().join(helpers::TINY_MODEL_NAME);
    let out = dir.path().join("run.json");
    let pid = std::process::id().to_string();
    let a = args(&[
        "--url",
        &app.base,
        "--api",
        "native",
        "--label",
        "tiny",
        "-c",
        "1,2",
        "--prompt-tokens",
        "8",
        "--max-tokens",
        "4",
        "--min-requests",
        "2",
        "--cold-adapters",
        "2",
        "--model-file",
        model.to_str().expect("utf-8 path"),
        "--server-pid",
        &pid,
    ]);
    let r = bench::run(&a).await.expect("run completes");
    let ids: Vec<&str> = r.scenarios.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "base/p8/c1",
            "base/p8/c2",
            "one-adapter/p8/c1",
            "one-adapter/p8/c2",
            "n-adapters/p8/c1",
            "n-adapters/p8/c2"
        ]
    );
    for s in &r.scenarios {
        let m = &s.summary;
        assert_eq!((m.failed, m.short), (0, 0), "{}: {:?}", s.id, m.failures);
        // --min-requests 2: two requests on one stream, or one on each of two.
        assert_eq!(m.requests, 2, "{}", s.id);
        assert_eq!(m.generated_tokens, m.requests * 4, "{}", s.id);
        assert!(m.aggregate_tps > 0.0 && m.wall_s > 0.0, "{}", s.id);
        assert!(m.ttft_ms_p50.is_some() && m.ttft_ms_p99.is_some());
        assert!(m.decode_tps_per_stream_p50.is_some_and(|d| d > 0.0));
        assert!(
            m.prompt_tokens_p50.is_some_and(|p| p > 8.0),
            "server-reported prompt length"
        );
        assert!(s.peak_rss.is_some_and(|p| p.mib > 1.0), "{}", s.id);
    }
    let cold = r.cold.as_ref().expect("cold scenario ran");
    assert_eq!(
        (cold.pairs.len(), cold.failed),
        (2, 0),
        "{:?}",
        cold.failures
    );
    // Uploaded in this run, so resident: the report must not call it a cold load.
    assert!(!cold.truly_cold);
    assert!(cold.added_ms_p50.is_some());

    // The JSON report round-trips into the comparison and the plot.
    std::fs::write(&out, serde_json::to_string(&r).expect("serialize")).expect("write");
    let back: RunReport =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("read")).expect("parse");
    // (Field checks, not `==`: a float need not survive JSON to the last bit.)
    assert_eq!(back.scenarios.len(), r.scenarios.len());
    assert_eq!(back.scenarios[5].scenario, r.scenarios[5].scenario);
    assert_eq!(back.scenarios[5].summary.generated_tokens, 8);
    assert_eq!(back.cold.map(|c| c.pairs.len()), Some(2));
    let mut peer = r.clone();
    peer.label = "peer".into();
    peer.scenarios.retain(|s| s.scenario.mode == Mode::Base);
    let cmp = bench::report::compare(&r, &peer, None);
    assert_eq!(cmp.ratios.len(), 6);
    assert!(cmp.ratios[0]
        .aggregate
        .is_some_and(|x| (x - 1.0).abs() < 1e-9));
    assert!(cmp.ratios[5].aggregate_vs_our_base.is_some());
    let svg = bench::plot::render_svg("t", &bench::plot::series_from(&r, Some(&peer)));
    assert_eq!(svg.matches("<polyline").count(), 3);
}

#[tokio::test]
async fn the_openai_api_drives_adapterd_through_v1_completions() {
    let app = helpers::spawn_app().await;
    let a = args(&[
        "--url",
        &app.base,
        "--modes",
        "base",
        "-c",
        "2",
        "--prompt-tokens",
        "8",
        "--max-tokens",
        "4",
        "--min-requests",
        "2",
    ]);
    let r = bench::run(&a).await.expect("run completes");
    // The model name came from GET /v1/models.
    assert_eq!(r.base_model.as_deref(), Some(helpers::TINY_MODEL_NAME));
    let m = &r.scenarios[0].summary;
    assert_eq!((m.ok, m.failed), (2, 0), "{:?}", m.failures);
    assert!(m.generated_tokens > 0);
}

#[tokio::test]
async fn the_two_rows_of_the_adapter_ratio_run_their_rounds_in_turn_and_report_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = helpers::spawn_app_in(dir.path(), |_| {}).await;
    let model = dir.path().join(helpers::TINY_MODEL_NAME);
    let a = args(&[
        "--url",
        &app.base,
        "--api",
        "native",
        "--modes",
        "n-adapters,base",
        "-c",
        "8",
        "--prompt-tokens",
        "8",
        "--max-tokens",
        "2",
        "--ratio-rounds",
        "3",
        "--model-file",
        model.to_str().expect("utf-8 path"),
        "--no-warmup",
    ]);
    let r = bench::run(&a).await.expect("run completes");
    // The table keeps the order asked for; each row has its own 3 rounds of 8 requests.
    let ids: Vec<&str> = r.scenarios.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["n-adapters/p8/c8", "base/p8/c8"]);
    for s in &r.scenarios {
        let m = &s.summary;
        assert_eq!(
            (m.requests, m.failed),
            (24, 0),
            "{}: {:?}",
            s.id,
            m.failures
        );
        assert_eq!(m.generated_tokens, 48, "{}", s.id);
        assert!(m.wall_s > 0.0 && m.aggregate_tps > 0.0, "{}", s.id);
    }
}

#[tokio::test]
async fn the_ratio_rows_alternate_round_by_round_on_the_server() {
    // Records, in arrival order, whether each request named an adapter (`model` ≠ "m").
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<bool>::new()));
    let log = seen.clone();
    let url = serve_connections(move |mut sock| {
        let log = log.clone();
        async move {
            let mut buf = vec![0u8; 16384];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            log.lock()
                .expect("log")
                .push(!text.contains("\"model\":\"m\""));
            const BODY: &str = "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(BODY.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let set = dir.path().join("adapters.json");
    let mix: Vec<String> = (0..8).map(|i| format!("ad{i}")).collect();
    let json =
        serde_json::json!({"mix": mix, "cold": [], "rank": 16, "cold_uploaded_this_run": false});
    std::fs::write(&set, json.to_string()).expect("write");
    let a = args(&[
        "--url",
        &url,
        "--model",
        "m",
        "--modes",
        "base,n-adapters",
        "-c",
        "8",
        "--prompt-tokens",
        "8",
        "--max-tokens",
        "1",
        "--ratio-rounds",
        "3",
        "--adapters-from",
        set.to_str().expect("utf-8 path"),
        "--no-warmup",
    ]);
    let r = bench::run(&a).await.expect("report");
    assert!(
        r.scenarios.iter().all(|s| s.summary.ok == 24),
        "{:?}",
        r.scenarios
    );
    let seen = seen.lock().expect("log").clone();
    // 8 adapter warm-ups, then base and adapter rounds of 8 in turn.
    let blocks: Vec<(bool, usize)> = seen
        .chunk_by(|x, y| x == y)
        .map(|c| (c[0], c.len()))
        .collect();
    assert_eq!(
        blocks,
        [
            (true, 8),
            (false, 8),
            (true, 8),
            (false, 8),
            (true, 8),
            (false, 8),
            (true, 8)
        ]
    );
}

#[tokio::test]
async fn refused_connections_and_http_errors_are_failed_requests_with_reasons() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let down = args(&[
        "--url",
        &format!("http://127.0.0.1:{port}"),
        "--modes",
        "base",
        "-c",
        "1,2",
        "--prompt-tokens",
        "8",
        "--min-requests",
        "1",
        "--model",
        "x",
    ]);
    let r = bench::run(&down).await.expect("a down server is a report");
    for s in &r.scenarios {
        assert_eq!(s.summary.ok, 0);
        assert_eq!(s.summary.failed, s.summary.requests);
        assert!(
            s.summary
                .failures
                .keys()
                .all(|k| k.starts_with("connect failed")),
            "{:?}",
            s.summary.failures
        );
    }
    // An unknown model is a 404 from adapterd.
    let app = helpers::spawn_app().await;
    let r = bench::run(&one_request(&app.base, "no-such-model"))
        .await
        .expect("report");
    let f = &r.scenarios[0].summary.failures;
    assert!(
        f.keys().any(|k| k.starts_with("HTTP 404: model_not_found")),
        "{f:?}"
    );
}

/// A loopback server that runs `handle` on every connection it accepts; its base URL.
async fn serve_connections<F, Fut>(handle: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(handle(sock));
        }
    });
    format!("http://{addr}")
}

/// A one-shot HTTP server that answers every connection with `body` as an event stream.
async fn canned_sse_server(body: &'static str) -> String {
    serve_connections(move |mut sock| async move {
        let mut buf = [0u8; 8192];
        let _ = sock.read(&mut buf).await;
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
        let _ = sock.write_all(head.as_bytes()).await;
        let _ = sock.write_all(body.as_bytes()).await;
        let _ = sock.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn malformed_streams_errors_mid_stream_and_early_ends_are_failed_requests() {
    let cases = [
        (
            "data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {not json\n\n",
            "malformed stream data",
        ),
        (
            "data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"error\":{\"message\":\"engine stopped\"}}\n\n",
            "error event from the server: engine stopped",
        ),
        (
            "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":null}]}\n\n",
            "stream ended before the final event",
        ),
    ];
    for (body, reason) in cases {
        let url = canned_sse_server(body).await;
        let r = bench::run(&one_request(&url, "m")).await.expect("report");
        let f = &r.scenarios[0].summary.failures;
        assert!(f.keys().any(|k| k.starts_with(reason)), "{reason}: {f:?}");
    }
}

/// A keep-alive server that answers one request per connection (a complete stream with a
/// `content-length`, no `connection: close`) and hangs up on a second request sent on the same
/// connection, as llama-server does once a connection has served its quota.
async fn one_request_per_connection_server() -> String {
    const BODY: &str = "data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
    serve_connections(|mut sock| async move {
        let mut buf = [0u8; 8192];
        let _ = sock.read(&mut buf).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
            BODY.len()
        );
        let _ = sock.write_all(head.as_bytes()).await;
        let _ = sock.write_all(BODY.as_bytes()).await;
        // The next request on this connection gets no answer.
        let _ = sock.read(&mut buf).await;
    })
    .await
}

#[tokio::test]
async fn requests_back_to_back_do_not_reuse_a_connection_the_server_may_have_closed() {
    let url = one_request_per_connection_server().await;
    let mut a = one_request(&url, "m");
    a.min_requests = 4;
    let r = bench::run(&a).await.expect("report");
    let m = &r.scenarios[0].summary;
    assert_eq!((m.ok, m.failed), (4, 0), "{:?}", m.failures);
}
