//! Prompt-prefix reuse through the API: a request whose prompt starts like an earlier one
//! reports the reused tokens (`usage.cached_tokens`; OpenAI's
//! `usage.prompt_tokens_details.cached_tokens`) and answers as it would without the cache;
//! tenants and adapters never share.

use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, spawn_app_with_auth, tiny_adapter_files, TestApp};

/// ~50 tokens with the tiny byte-level tokenizer: three whole 16-token blocks.
const SYSTEM: &str = "You are a careful assistant; answer briefly and politely.\n";

async fn generate(app: &TestApp, prompt: &str, adapter: Option<&str>) -> Value {
    let mut body = json!({"prompt": prompt, "temperature": 0, "max_new_tokens": 8,
                          "logprobs": true, "ignore_eos": true});
    if let Some(a) = adapter {
        body["adapter_id"] = json!(a);
    }
    let resp = app.post("/v1/generate", &body).await;
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().await.unwrap()
}

fn cached(v: &Value) -> u64 {
    v["usage"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.cached_tokens in {v}"))
}

fn logprobs(v: &Value) -> Vec<f64> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_shared_prefix_is_reused_and_the_answer_does_not_change() {
    let app = spawn_app().await;
    let plain = spawn_app_with(|s| s.engine.prefix_cache_bytes = 0).await;
    let (first, second) = (format!("{SYSTEM}ab"), format!("{SYSTEM}the cat"));
    let n: Value = app.post_json("/v1/tokenize", &json!({"text": first})).await;
    assert!(n["tokens"].as_array().unwrap().len() > 48, "{n}");

    assert_eq!(cached(&generate(&app, &first, None).await), 0);
    let hit = generate(&app, &second, None).await;
    let reused = cached(&hit);
    assert!(reused >= 48 && reused.is_multiple_of(16), "{hit}");
    assert!(reused < hit["usage"]["prompt_tokens"].as_u64().unwrap());

    // The same request without any cache: the same text, the same logprobs (the cached keys
    // and values are the ones a fresh prefill computes, up to summation order).
    let want = generate(&plain, &second, None).await;
    assert_eq!(cached(&want), 0);
    assert_eq!(hit["text"], want["text"]);
    for (a, b) in logprobs(&hit).iter().zip(logprobs(&want)) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }

    // OpenAI's field, on completions and on chat (whose template is itself a shared prefix).
    let c = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": format!("{SYSTEM}xyz"), "max_tokens": 2}),
        )
        .await;
    assert!(
        c["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() >= Some(48),
        "{c}"
    );
    let chat = |content: &str| {
        json!({"model": "tiny", "max_tokens": 2,
               "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]})
    };
    app.post_json("/v1/chat/completions", &chat("hello")).await;
    let c = app.post_json("/v1/chat/completions", &chat("bye")).await;
    assert!(
        c["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() >= Some(48),
        "{c}"
    );

    // Scoring reads the whole prompt: no reuse.
    let scored = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": second, "max_tokens": 0, "echo": true,
                    "logprobs": 1}),
        )
        .await;
    assert_eq!(
        scored["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{scored}"
    );
}

/// A chat's next turn sends the whole conversation again: the reply of the previous turn is
/// reused as well as its prompt.
#[tokio::test]
async fn the_next_turn_reuses_the_previous_reply() {
    let app = spawn_app().await;
    let first = app
        .post_json(
            "/v1/generate",
            &json!({"prompt": SYSTEM, "temperature": 0, "max_new_tokens": 24,
                    "logprobs": true, "ignore_eos": true}),
        )
        .await;
    let reply: Vec<u64> = first["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let prompt: Value = app
        .post_json("/v1/tokenize", &json!({"text": SYSTEM}))
        .await;
    let mut ids: Vec<u64> = prompt["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    let prompt_blocks = ids.len() / 16;
    ids.extend(&reply);
    // The cache holds the prompt and all of the reply but its last token.
    let held = ids.len() - 1;
    assert!(held / 16 > prompt_blocks, "the reply must complete a block");
    // The next user turn: 20 more tokens.
    ids.extend(10..30);
    let next = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": ids, "max_tokens": 1}),
        )
        .await;
    assert_eq!(
        next["usage"]["prompt_tokens_details"]["cached_tokens"],
        held / 16 * 16,
        "{next}"
    );
    // That turn started from a cached prefix, so its own blocks were kept only when it
    // finished: the turn after it still finds all of them.
    assert!(ids.len() / 16 > held / 16);
    ids.extend([40, 41, 42]);
    let third = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": ids, "max_tokens": 1}),
        )
        .await;
    assert_eq!(
        third["usage"]["prompt_tokens_details"]["cached_tokens"],
        (ids.len() - 3) / 16 * 16,
        "{third}"
    );
}

/// The process-wide count of prompt tokens served from the cache (other tests in this binary
/// only add to it).
async fn hit_tokens(app: &TestApp) -> u64 {
    let text = app.get_text("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("adapterd_prefix_cache_hit_tokens_total "))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

/// `n` choices read one prompt: one of them computes it, the others wait for it and start from
/// its cached prefix. (Prefill in 16-token steps, so the twins arrive while it runs.)
#[tokio::test]
async fn choices_of_one_prompt_compute_it_once() {
    let app = spawn_app_with(|s| s.engine.max_step_tokens = 16).await;
    let before = hit_tokens(&app).await;
    let v = app
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": format!("{SYSTEM}x"), "n": 4, "max_tokens": 2,
                    "temperature": 1.0, "seed": 5}),
        )
        .await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 4, "{v}");
    let reused = hit_tokens(&app).await - before;
    assert!(
        reused >= 3 * 48,
        "three choices reused the first one's 48 tokens: {reused}"
    );
}

#[tokio::test]
async fn tenants_and_adapters_do_not_share_prefixes() {
    let app = spawn_app_with_auth().await;
    let (p, q) = (format!("{SYSTEM}one"), format!("{SYSTEM}two"));
    assert_eq!(cached(&generate(&app.a, &p, None).await), 0);
    assert!(cached(&generate(&app.a, &q, None).await) > 0);
    assert_eq!(
        cached(&generate(&app.b, &q, None).await),
        0,
        "tenant b must not reuse tenant a's prompt"
    );

    let (config, weights) = tiny_adapter_files(3, 2.0);
    let resp = app.a.post_adapter("mine", config, weights).await;
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(
        cached(&generate(&app.a, &p, Some("mine")).await),
        0,
        "the base's keys and values are not the adapter's"
    );
    assert!(cached(&generate(&app.a, &q, Some("mine")).await) > 0);
}
