//! `GET /v1/chinchilla` and `GET /chinchilla` over real HTTP: the planner's router alone on
//! 127.0.0.1:0, driven with reqwest. Values are checked against `adapterd::scaling` and the
//! issue's worked example; every bad input must answer 400/422 with the error envelope.
//! Also holds the (ignored) server that `scripts/browser_test_chinchilla.sh` drives.

use std::net::SocketAddr;

use adapterd::scaling::{self, Fit};
use serde_json::Value;

/// Serves the planner's router on a fresh loopback port until the test process ends.
async fn spawn() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let app: axum::Router = adapterd::api::chinchilla::routes();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn get_text(addr: SocketAddr, path_and_query: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{addr}{path_and_query}"))
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        ctype.starts_with("application/json"),
        "{path_and_query}: content-type {ctype}"
    );
    (status, resp.text().await.expect("body"))
}

async fn get(addr: SocketAddr, path_and_query: &str) -> (u16, Value) {
    let (status, text) = get_text(addr, path_and_query).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path_and_query}: {e}: {text}"));
    (status, v)
}

/// The body must be the library's plan to the last bit. Compared as text: serde_json's writer
/// is exact, its default parser may round the last bit.
async fn assert_same_as_library(addr: SocketAddr, path_and_query: &str, want: &scaling::Plan) {
    let (status, text) = get_text(addr, path_and_query).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, serde_json::to_string(want).expect("json"));
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

#[tokio::test]
async fn plan_at_1e22_reproduces_the_worked_example_and_the_library() {
    let addr = spawn().await;
    let (status, v) = get(addr, "/v1/chinchilla?flops=1e22").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["fit"], "hoffmann2022");
    assert_eq!(num(&v, &["flops"]), 1e22);
    assert!(v.get("inference_aware").is_none());
    // The classic example: N ≈ 9.1B, D ≈ 183B, loss ≈ 2.146.
    let n = num(&v, &["rule_of_thumb", "params"]);
    let d = num(&v, &["rule_of_thumb", "tokens"]);
    assert!((n / 9.1287e9 - 1.0).abs() < 1e-4, "{n}");
    assert!((d / 182.574e9 - 1.0).abs() < 1e-4, "{d}");
    assert_eq!(
        format!("{:.3}", num(&v, &["rule_of_thumb", "loss"])),
        "2.146"
    );
    assert_eq!(num(&v, &["rule_of_thumb", "tokens_per_param"]), 20.0);
    assert_eq!(num(&v, &["constants", "E"]), 1.69);
    assert_eq!(num(&v, &["constants", "alpha"]), 0.34);
    // Full precision: the JSON is exactly the library's plan.
    let want = scaling::plan(1e22, Fit::Hoffmann2022, None).expect("plan");
    assert_same_as_library(addr, "/v1/chinchilla?flops=1e22", &want).await;
}

#[tokio::test]
async fn plan_with_fit_and_inference_tokens_matches_the_library() {
    let addr = spawn().await;
    let (status, v) = get(
        addr,
        "/v1/chinchilla?flops=3.5e23&fit=besiroglu2024&inference_tokens=2e13",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["fit"], "besiroglu2024");
    let want = scaling::plan(3.5e23, Fit::Besiroglu2024, Some(2e13)).expect("plan");
    assert_same_as_library(
        addr,
        "/v1/chinchilla?flops=3.5e23&fit=besiroglu2024&inference_tokens=2e13",
        &want,
    )
    .await;
    let ia = &v["inference_aware"];
    for key in [
        "inference_tokens",
        "loss_target",
        "params",
        "tokens",
        "train_flops",
        "inference_flops",
        "total_flops",
        "saving_vs_compute_optimal",
    ] {
        assert!(ia[key].is_number(), "{key} in {ia}");
    }
    let saving = num(ia, &["saving_vs_compute_optimal"]);
    assert!(saving > 0.0 && saving < 1.0, "{saving}");
    assert_eq!(
        num(ia, &["loss_target"]),
        num(&v, &["compute_optimal", "loss"])
    );
    // Explicit default fit and T = 0 (the compute-optimal model itself).
    let (status, v) = get(
        addr,
        "/v1/chinchilla?flops=1e22&fit=hoffmann2022&inference_tokens=0",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        num(&v, &["inference_aware", "saving_vs_compute_optimal"]),
        0.0
    );
}

#[tokio::test]
async fn every_bad_input_gets_the_error_envelope_naming_the_field() {
    let addr = spawn().await;
    let cases: &[(&str, u16, &str)] = &[
        ("", 400, "flops"),
        ("?fit=hoffmann2022", 400, "flops"),
        ("?flops=", 400, "flops"),
        ("?flops=abc", 400, "flops"),
        ("?flops=1e22e3", 400, "flops"),
        ("?flops=nan", 422, "flops"),
        ("?flops=NaN", 422, "flops"),
        ("?flops=inf", 422, "flops"),
        ("?flops=-inf", 422, "flops"),
        ("?flops=infinity", 422, "flops"),
        ("?flops=1e400", 422, "flops"),
        ("?flops=0", 422, "flops"),
        ("?flops=-0", 422, "flops"),
        ("?flops=-1e22", 422, "flops"),
        ("?flops=5e-324", 422, "flops"),
        ("?flops=1e22&fit=kaplan2020", 422, "fit"),
        ("?flops=1e22&fit=HOFFMANN2022", 422, "fit"),
        ("?flops=1e22&inference_tokens=-1", 422, "inference_tokens"),
        (
            "?flops=1e22&inference_tokens=-1e13",
            422,
            "inference_tokens",
        ),
        ("?flops=1e22&inference_tokens=nan", 422, "inference_tokens"),
        ("?flops=1e22&inference_tokens=inf", 422, "inference_tokens"),
        (
            "?flops=1e22&inference_tokens=1e400",
            422,
            "inference_tokens",
        ),
        (
            "?flops=1e22&inference_tokens=1e300",
            422,
            "inference_tokens",
        ),
        ("?flops=1e22&inference_tokens=many", 400, "inference_tokens"),
        ("?flops=1e22&flops=1e23", 400, "flops"),
        ("?flops=1e22&inference_token=1e13", 400, "inference_token"),
        ("?flops=%FF", 400, "flops"),
    ];
    for (query, want_status, field) in cases {
        let (status, v) = get(addr, &format!("/v1/chinchilla{query}")).await;
        assert_eq!(status, *want_status, "{query}: {v}");
        let code = v["error"]["code"].as_str().unwrap_or_default();
        let message = v["error"]["message"].as_str().unwrap_or_default();
        let want_code = if *want_status == 400 {
            "invalid_request"
        } else {
            "invalid_value"
        };
        assert_eq!(code, want_code, "{query}: {v}");
        assert!(
            message.contains(field),
            "{query}: message must name {field}: {v}"
        );
        assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{query}: {v}");
    }
}

#[tokio::test]
async fn page_is_self_contained_html_wired_to_the_endpoint() {
    let addr = spawn().await;
    let resp = reqwest::get(format!("http://{addr}/chinchilla"))
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ctype.starts_with("text/html"), "{ctype}");
    let html = resp.text().await.expect("body");
    for needle in [
        "id=\"log-flops\"",
        "min=\"18\"",
        "max=\"27\"",
        "id=\"fit\"",
        "id=\"inference-tokens\"",
        "id=\"plot\"",
        "/v1/chinchilla",
    ] {
        assert!(html.contains(needle), "page lacks {needle}");
    }
    // No CDN, no remote fonts: nothing is loaded from another origin.
    for remote in ["http://", "https://", "src=\"//", "href=\"//"] {
        assert!(!html.contains(remote), "page references {remote}");
    }
}

/// The server `scripts/browser_test_chinchilla.sh` points headless Chromium at: binds
/// 127.0.0.1:0, writes the port to `$CHINCHILLA_PORT_FILE`, serves until killed (at most 10
/// minutes). Ignored in normal runs.
#[tokio::test]
#[ignore = "run by scripts/browser_test_chinchilla.sh"]
async fn serve_for_browser_test() {
    let Ok(port_file) = std::env::var("CHINCHILLA_PORT_FILE") else {
        panic!("set CHINCHILLA_PORT_FILE to a path to receive the port");
    };
    let addr = spawn().await;
    let tmp = format!("{port_file}.tmp");
    std::fs::write(&tmp, addr.port().to_string()).expect("write port");
    std::fs::rename(&tmp, &port_file).expect("publish port");
    tokio::time::sleep(std::time::Duration::from_secs(600)).await;
}
