//! Loopback load test: starts `adapterd serve --auth` on the tiny test model with three
//! tenants, drives N concurrent clients for D seconds mixing generate, streamed generate,
//! OpenAI chat, adapter upload, adapter list, file upload and fine-tuning job submission, then
//! checks that every acknowledged upload is present and intact (sha256), that every
//! acknowledged job succeeds and its adapter serves, that every response was a 2xx or a
//! deliberate 4xx (no 5xx, no connection errors), and that the server's peak RSS (VmHWM)
//! stayed under a bound. Exits non-zero on any violation. Run by scripts/load_test.sh:
//!
//! ```text
//! cargo run --example load_test -- --bin target/debug/adapterd --clients 16 --seconds 20
//! ```

#[allow(dead_code)]
#[path = "../tests/api/helpers.rs"]
mod helpers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Parser, Debug)]
#[command(
    about = "Loopback load test for adapterd: mixed traffic, then integrity and memory checks"
)]
struct Args {
    /// The adapterd binary to start.
    #[arg(long, default_value = "target/debug/adapterd")]
    bin: PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How long the clients send requests.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Peak resident memory of the server allowed, in MiB.
    #[arg(long, default_value_t = 1024)]
    max_rss_mib: u64,
    /// Seed for the clients' choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

const TENANTS: [&str; 3] = ["t-alpha", "t-beta", "t-gamma"];

#[derive(Default)]
struct Tally {
    /// (operation, status class "2xx"/"4xx"/"5xx") -> count.
    by_class: BTreeMap<(String, String), u64>,
    /// Requests that got no complete answer: connect/reset/timeout/broken body.
    transport_errors: Vec<String>,
    /// 5xx answers, kept to report.
    server_errors: Vec<String>,
    /// (tenant, adapter name, version) -> sha256 of config + weights, for every 201.
    adapters: BTreeMap<(usize, String, i64), String>,
    /// (tenant, file id) -> sha256 of the content, for every 200.
    files: BTreeMap<(usize, String), String>,
    /// (tenant, job id) -> adapter name, for every 202.
    jobs: BTreeMap<(usize, String), String>,
}

type Shared = Arc<Mutex<Tally>>;

fn sha256(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize())
}

fn record(t: &Shared, op: &str, status: u16, body: &str) {
    let class = format!("{}xx", status / 100);
    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
    *t.by_class.entry((op.to_owned(), class)).or_default() += 1;
    if status >= 500 {
        t.server_errors.push(format!(
            "{op}: {status} {}",
            body.chars().take(200).collect::<String>()
        ));
    }
}

fn transport(t: &Shared, op: &str, e: impl std::fmt::Display) {
    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
    t.transport_errors.push(format!("{op}: {e}"));
}

struct Client {
    http: reqwest::Client,
    base: String,
    tenant: usize,
    id: usize,
}

impl Client {
    /// Sends, reads the whole body (a stream to its end), tallies; returns status and body.
    async fn send(
        &self,
        t: &Shared,
        op: &str,
        req: reqwest::RequestBuilder,
    ) -> Option<(u16, String)> {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                transport(t, op, e);
                return None;
            }
        };
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => body.extend_from_slice(&c),
                Err(e) => {
                    transport(
                        t,
                        op,
                        format!("body broken after {} bytes: {e}", body.len()),
                    );
                    return None;
                }
            }
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        if (400..500).contains(&status)
            && serde_json::from_str::<Value>(&body).map_or(true, |v| v["error"]["code"].is_null())
        {
            transport(
                t,
                op,
                format!("{status} without the error envelope: {body}"),
            );
        }
        record(t, op, status, &body);
        Some((status, body))
    }

    async fn one(&self, t: &Shared, rng: &mut rand::rngs::StdRng, n: u64) {
        let base = &self.base;
        let pick = rng.random_range(0..100);
        let adapter = format!("c{}-a{}", self.id, rng.random_range(0..3));
        match pick {
            0..=24 => {
                let body = json!({"prompt": format!("request {n} of client {}", self.id), "max_new_tokens": rng.random_range(1..24), "temperature": 0.7, "seed": n});
                self.send(
                    t,
                    "generate",
                    self.http.post(format!("{base}/v1/generate")).json(&body),
                )
                .await;
            }
            25..=39 => {
                let body = json!({"prompt": "the cat", "max_new_tokens": rng.random_range(1..48), "stream": true});
                self.send(
                    t,
                    "generate_stream",
                    self.http.post(format!("{base}/v1/generate")).json(&body),
                )
                .await;
            }
            40..=54 => {
                let stream = rng.random_bool(0.5);
                let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": rng.random_range(1..24), "stream": stream});
                self.send(
                    t,
                    "chat",
                    self.http
                        .post(format!("{base}/v1/chat/completions"))
                        .json(&body),
                )
                .await;
            }
            55..=64 => {
                // An adapter of the caller's (maybe not uploaded yet: 404 is deliberate).
                let body = json!({"prompt": "hi", "adapter_id": adapter, "max_new_tokens": 4});
                self.send(
                    t,
                    "generate_adapter",
                    self.http.post(format!("{base}/v1/generate")).json(&body),
                )
                .await;
            }
            65..=76 => {
                let (config, weights) =
                    helpers::tiny_adapter_files(self.id as u64 * 1_000_000 + n, 2.0);
                let sha = sha256(&[&config, &weights]);
                let form = reqwest::multipart::Form::new()
                    .text("name", adapter.clone())
                    .part(
                        "adapter_config.json",
                        reqwest::multipart::Part::bytes(config).file_name("adapter_config.json"),
                    )
                    .part(
                        "adapter_model.safetensors",
                        reqwest::multipart::Part::bytes(weights)
                            .file_name("adapter_model.safetensors"),
                    );
                if let Some((201, body)) = self
                    .send(
                        t,
                        "adapter_upload",
                        self.http
                            .post(format!("{base}/v1/adapters"))
                            .multipart(form),
                    )
                    .await
                {
                    let v: Value = serde_json::from_str(&body).unwrap_or_default();
                    let version = v["version"].as_i64().unwrap_or(-1);
                    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                    if v["sha256"] != sha.as_str() {
                        t.transport_errors.push(format!(
                            "upload {adapter}: acknowledged sha256 {} is not the upload's",
                            v["sha256"]
                        ));
                    }
                    t.adapters.insert((self.tenant, adapter, version), sha);
                }
            }
            77..=88 => {
                self.send(
                    t,
                    "adapter_list",
                    self.http.get(format!("{base}/v1/adapters")),
                )
                .await;
            }
            96..=99 => {
                // A small SFT job; past finetune.max_active_per_tenant the 429 is deliberate.
                let name = format!("c{}-j{n}", self.id);
                let body = json!({
                    "method": "sft",
                    "adapter_name": name,
                    "training_data": [{"prompt": "ab", "completion": format!("x{n}")}],
                    "hyperparameters": {"rank": 2, "max_steps": 3, "batch_size": 1},
                });
                if let Some((202, body)) = self
                    .send(
                        t,
                        "finetune_submit",
                        self.http.post(format!("{base}/v1/finetune")).json(&body),
                    )
                    .await
                {
                    let v: Value = serde_json::from_str(&body).unwrap_or_default();
                    let id = v["id"].as_str().unwrap_or_default().to_owned();
                    t.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .jobs
                        .insert((self.tenant, id), name);
                }
                self.send(
                    t,
                    "finetune_list",
                    self.http.get(format!("{base}/v1/finetune")),
                )
                .await;
            }
            _ => {
                let content = format!(
                    "{{\"prompt\": \"q{n}\", \"completion\": \"a{}\"}}\n",
                    self.id
                )
                .repeat(rng.random_range(1..20));
                let sha = sha256(&[content.as_bytes()]);
                let form = reqwest::multipart::Form::new()
                    .text("purpose", "fine-tune")
                    .part(
                        "file",
                        reqwest::multipart::Part::bytes(content.into_bytes())
                            .file_name("train.jsonl"),
                    );
                if let Some((200, body)) = self
                    .send(
                        t,
                        "file_upload",
                        self.http.post(format!("{base}/v1/files")).multipart(form),
                    )
                    .await
                {
                    let v: Value = serde_json::from_str(&body).unwrap_or_default();
                    let id = v["id"].as_str().unwrap_or_default().to_owned();
                    t.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .files
                        .insert((self.tenant, id), sha);
                }
            }
        }
    }
}

fn client_for(key: &str) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse()?,
    );
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(120))
        .build()?)
}

fn create_key(bin: &Path, db_url: &str, tenant: &str) -> Result<String> {
    let out = Command::new(bin)
        .args([
            "keys",
            "create",
            "--tenant",
            tenant,
            "--database-url",
            db_url,
        ])
        .output()
        .context("running adapterd keys create")?;
    if !out.status.success() {
        bail!("keys create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find(|w| w.starts_with("sk-adapterd-"))
        .map(str::to_owned)
        .context("no key in the output of keys create")
}

fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny");
    helpers::write_tiny_model(&model, 7);
    let db_url = format!("sqlite://{}", dir.path().join("adapterd.db").display());
    let keys: Vec<String> = TENANTS
        .iter()
        .map(|t| create_key(&args.bin, &db_url, t))
        .collect::<Result<_>>()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nbind = \"127.0.0.1:{port}\"\n[model]\npath = \"{}\"\n\
             [storage]\nadapters_dir = \"{}\"\ndatabase_url = \"{db_url}\"\n",
            model.display(),
            dir.path().join("adapters").display()
        ),
    )?;
    let log_path = dir.path().join("server.log");
    let child = Command::new(&args.bin)
        .args(["serve", "--auth", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .context("starting adapterd")?;
    let server = ServerProcess(child);
    let pid = server.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let probe = reqwest::Client::new();
    let started = Instant::now();
    while !probe
        .get(format!("{base}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "server not ready in 120 s: {}",
                std::fs::read_to_string(&log_path)?
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let tally: Shared = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let peak_sampled = Arc::new(Mutex::new(0u64));
    let sampler = {
        let peak = peak_sampled.clone();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                if let Some(kib) = vm_kib(pid, "VmRSS:") {
                    let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                    *p = (*p).max(kib);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for id in 0..args.clients {
        let tenant = id % TENANTS.len();
        let c = Client {
            http: client_for(&keys[tenant])?,
            base: base.clone(),
            tenant,
            id,
        };
        let tally = tally.clone();
        let seed = args.seed.wrapping_mul(1000).wrapping_add(id as u64);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut n = 0u64;
            while Instant::now() < deadline {
                c.one(&tally, &mut rng, n).await;
                n += 1;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let _ = sampler.await;

    // Afterwards: every acknowledged item is there and intact.
    let (adapters, files) = {
        let t = tally.lock().unwrap_or_else(|e| e.into_inner());
        (t.adapters.clone(), t.files.clone())
    };
    let clients: Vec<reqwest::Client> =
        keys.iter().map(|k| client_for(k)).collect::<Result<_>>()?;
    let mut problems = Vec::new();
    let mut listed: BTreeMap<(usize, String), Value> = BTreeMap::new();
    for (tenant, name, _) in adapters.keys() {
        if listed.contains_key(&(*tenant, name.clone())) {
            continue;
        }
        let v: Value = clients[*tenant]
            .get(format!("{base}/v1/adapters/{name}"))
            .send()
            .await?
            .json()
            .await?;
        listed.insert((*tenant, name.clone()), v);
    }
    for ((tenant, name, version), sha) in &adapters {
        let found = listed[&(*tenant, name.clone())]["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["version"] == *version))
            .map(|v| v["sha256"].clone());
        if found != Some(Value::from(sha.as_str())) {
            problems.push(format!(
                "adapter {name}@{version} of {}: {found:?}, expected {sha}",
                TENANTS[*tenant]
            ));
        }
    }
    for (tenant, name) in listed.keys() {
        let r = clients[*tenant]
            .post(format!("{base}/v1/generate"))
            .json(&json!({"prompt": "hi", "adapter_id": name, "max_new_tokens": 2}))
            .send()
            .await?;
        if r.status() != 200 {
            problems.push(format!(
                "adapter {name} of {} does not generate: {}",
                TENANTS[*tenant],
                r.status()
            ));
        }
    }
    for ((tenant, id), sha) in &files {
        let r = clients[*tenant]
            .get(format!("{base}/v1/files/{id}/content"))
            .send()
            .await?;
        let status = r.status();
        let body = r.bytes().await?;
        if status != 200 || sha256(&[&body]) != *sha {
            problems.push(format!(
                "file {id} of {}: {status}, content changed or missing",
                TENANTS[*tenant]
            ));
        }
    }
    // Every acknowledged job finishes (they train one at a time after the load) and its
    // adapter is stored and serves.
    let jobs = tally.lock().unwrap_or_else(|e| e.into_inner()).jobs.clone();
    let jobs_deadline = Instant::now() + Duration::from_secs(120);
    let mut jobs_over_quota = 0usize;
    for ((tenant, id), name) in &jobs {
        let job = loop {
            let v: Value = clients[*tenant]
                .get(format!("{base}/v1/finetune/{id}"))
                .send()
                .await?
                .json()
                .await?;
            let status = v["status"].as_str().unwrap_or_default().to_owned();
            if !matches!(status.as_str(), "queued" | "running") || Instant::now() > jobs_deadline {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // A job whose result would take its tenant past the adapter quota fails with that
        // reason: deliberate, like a 403 on an upload.
        let over_quota = job["status"] == "failed"
            && job["error"]
                .as_str()
                .is_some_and(|e| e.contains("limits.max_adapter_"));
        if over_quota {
            jobs_over_quota += 1;
            continue;
        }
        if job["status"] != "succeeded" {
            problems.push(format!(
                "job {id} of {}: {} ({})",
                TENANTS[*tenant], job["status"], job["error"]
            ));
            continue;
        }
        let r = clients[*tenant]
            .post(format!("{base}/v1/generate"))
            .json(&json!({"prompt": "ab", "adapter_id": name, "max_new_tokens": 2}))
            .send()
            .await?;
        if r.status() != 200 {
            problems.push(format!(
                "job {id}'s adapter {name} does not generate: {}",
                r.status()
            ));
        }
    }
    let hwm_kib = vm_kib(pid, "VmHWM:").unwrap_or(0);
    let sampled = *peak_sampled.lock().unwrap_or_else(|e| e.into_inner());
    drop(server);

    let t = tally.lock().unwrap_or_else(|e| e.into_inner());
    let total: u64 = t.by_class.values().sum();
    let mut classes: BTreeMap<String, u64> = BTreeMap::new();
    for ((_, class), n) in &t.by_class {
        *classes.entry(class.clone()).or_default() += n;
    }
    println!(
        "== load test: {} clients over {} tenants, {} s",
        args.clients,
        TENANTS.len(),
        args.seconds
    );
    for ((op, class), n) in &t.by_class {
        println!("  {op:<18} {class}  {n}");
    }
    println!(
        "  requests {total} ({:.1}/s); by class {classes:?}; transport errors {}; 5xx {}",
        total as f64 / args.seconds as f64,
        t.transport_errors.len(),
        t.server_errors.len()
    );
    println!(
        "  acknowledged: {} adapter versions, {} files, {} fine-tuning jobs ({} of them failed \
         at the tenant's adapter quota); all present and intact, the other jobs succeeded and \
         serve: {}",
        adapters.len(),
        files.len(),
        jobs.len(),
        jobs_over_quota,
        problems.is_empty()
    );
    println!(
        "  server peak RSS (VmHWM) {:.1} MiB (largest sampled VmRSS {:.1} MiB), bound {} MiB",
        hwm_kib as f64 / 1024.0,
        sampled as f64 / 1024.0,
        args.max_rss_mib
    );
    let mut failed = false;
    for e in t
        .transport_errors
        .iter()
        .chain(&t.server_errors)
        .chain(&problems)
        .take(20)
    {
        eprintln!("  FAIL: {e}");
        failed = true;
    }
    if hwm_kib == 0 || hwm_kib / 1024 > args.max_rss_mib {
        eprintln!(
            "  FAIL: peak RSS {hwm_kib} KiB (bound {} MiB)",
            args.max_rss_mib
        );
        failed = true;
    }
    if total == 0 || adapters.is_empty() || files.is_empty() || jobs.is_empty() {
        eprintln!(
            "  FAIL: the mix did not run (requests {total}, adapters {}, files {}, jobs {})",
            adapters.len(),
            files.len(),
            jobs.len()
        );
        failed = true;
    }
    if failed {
        bail!("load test failed");
    }
    println!("load test: 1 passed, 0 failed");
    Ok(())
}
