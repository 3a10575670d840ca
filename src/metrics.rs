//! Metric names (prefix `adapterd_`, units in the name, design §5), described once, and the
//! Prometheus recorder, installed once per process so many test apps can share it.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS_TOTAL: &str = "adapterd_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "adapterd_http_request_duration_seconds";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "adapterd_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "adapterd_inter_token_latency_seconds";
pub const E2E_REQUEST_LATENCY_SECONDS: &str = "adapterd_e2e_request_latency_seconds";
pub const REQUEST_QUEUE_SECONDS: &str = "adapterd_request_queue_seconds";
pub const PROMPT_TOKENS_TOTAL: &str = "adapterd_prompt_tokens_total";
pub const PREFIX_CACHE_HIT_TOKENS_TOTAL: &str = "adapterd_prefix_cache_hit_tokens_total";
pub const PREFIX_CACHE_BYTES: &str = "adapterd_prefix_cache_bytes";
pub const GENERATION_TOKENS_TOTAL: &str = "adapterd_generation_tokens_total";
pub const REQUESTS_RUNNING: &str = "adapterd_requests_running";
pub const REQUESTS_WAITING: &str = "adapterd_requests_waiting";
pub const BATCH_SIZE: &str = "adapterd_batch_size";
pub const ADAPTER_LOADS_TOTAL: &str = "adapterd_adapter_loads_total";
pub const ADAPTER_LOAD_SECONDS: &str = "adapterd_adapter_load_seconds";
pub const ADAPTER_CACHE_HITS_TOTAL: &str = "adapterd_adapter_cache_hits_total";
pub const ADAPTER_CACHE_MISSES_TOTAL: &str = "adapterd_adapter_cache_misses_total";
pub const ADAPTER_CACHE_EVICTIONS_TOTAL: &str = "adapterd_adapter_cache_evictions_total";
pub const ADAPTER_CACHE_BYTES: &str = "adapterd_adapter_cache_bytes";
pub const ADAPTERS_RESIDENT: &str = "adapterd_adapters_resident";
pub const FINETUNE_JOBS: &str = "adapterd_finetune_jobs";
pub const FINETUNE_STEPS_TOTAL: &str = "adapterd_finetune_steps_total";
pub const FINETUNE_STEP_SECONDS: &str = "adapterd_finetune_step_seconds";
pub const FINETUNE_TOKENS_TOTAL: &str = "adapterd_finetune_tokens_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder on first call and returns the handle that renders
/// `/metrics`. Later calls (more apps in one test process) reuse it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(BATCH_SIZE.into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program); then our
            // handle still renders, just without the other recorder's data.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(FINETUNE_JOBS, "Fine-tuning jobs by status");
    describe_counter!(FINETUNE_STEPS_TOTAL, "Optimizer steps done, by method");
    describe_histogram!(
        FINETUNE_STEP_SECONDS,
        Unit::Seconds,
        "Wall time of one optimizer step"
    );
    describe_counter!(FINETUNE_TOKENS_TOTAL, "Tokens through the training forward");
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests by matched route, method and status"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "HTTP request duration by route"
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Enqueue to first generated token"
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY_SECONDS,
        Unit::Seconds,
        "Time between generated tokens of a sequence"
    );
    describe_histogram!(
        E2E_REQUEST_LATENCY_SECONDS,
        Unit::Seconds,
        "Enqueue to last token"
    );
    describe_histogram!(
        REQUEST_QUEUE_SECONDS,
        Unit::Seconds,
        "Time a request waited before running"
    );
    describe_counter!(PROMPT_TOKENS_TOTAL, "Prompt tokens accepted by the engine");
    describe_counter!(
        PREFIX_CACHE_HIT_TOKENS_TOTAL,
        "Prompt tokens not computed because a cached prefix held them"
    );
    describe_gauge!(
        PREFIX_CACHE_BYTES,
        "Bytes of prompt-prefix keys and values kept for reuse"
    );
    describe_counter!(GENERATION_TOKENS_TOTAL, "Tokens generated");
    describe_gauge!(REQUESTS_RUNNING, "Sequences in the running batch");
    describe_gauge!(REQUESTS_WAITING, "Requests queued for the engine");
    describe_histogram!(BATCH_SIZE, "Sequences per forward step");
    describe_counter!(ADAPTER_LOADS_TOTAL, "Adapter loads from disk by result");
    describe_histogram!(
        ADAPTER_LOAD_SECONDS,
        Unit::Seconds,
        "Time to load and validate an adapter from disk"
    );
    describe_counter!(
        ADAPTER_CACHE_HITS_TOTAL,
        "Adapter resolutions served from the resident cache"
    );
    describe_counter!(
        ADAPTER_CACHE_MISSES_TOTAL,
        "Adapter resolutions that loaded from disk"
    );
    describe_counter!(
        ADAPTER_CACHE_EVICTIONS_TOTAL,
        "Adapters evicted from the resident cache"
    );
    describe_gauge!(
        ADAPTER_CACHE_BYTES,
        Unit::Bytes,
        "Bytes of resident adapters"
    );
    describe_gauge!(ADAPTERS_RESIDENT, "Adapters resident in memory");
}
