//! Faults, against the real binary (`adapterd serve` as a child process on a free loopback
//! port, serving the tiny test model): kill -9 at a random moment while adapters are being
//! uploaded, then a restart on the same directories must have lost nothing acknowledged and
//! kept nothing half-written; a truncated adapter file fails only that adapter
//! (`adapter_damaged`); SIGTERM ends a stream in flight cleanly within the grace period and the
//! process exits 0; a fine-tuning job survives kill -9 (resumes from its last periodic
//! checkpoint) and SIGTERM (checkpoints at the step it reached, resumes exactly there).

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use helpers::{
    adapter_form, last_event, tiny_adapter_files, write_long_context_model, write_tiny_model,
};

/// A running `adapterd serve`.
struct Server {
    child: Child,
    base: String,
    client: reqwest::Client,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Settings for a server on `port` with its model, database and store under `dir`.
fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let text = format!(
        "[server]\nbind = \"127.0.0.1:{port}\"\n{extra}\n\
         [model]\npath = \"{model}\"\nthreads = 1\n\
         [storage]\nadapters_dir = \"{store}\"\ndatabase_url = \"sqlite://{db}\"\n",
        model = dir.join("tiny").display(),
        store = dir.join("adapters").display(),
        db = dir.join("adapterd.db").display(),
    );
    let path = dir.join(format!("config-{port}.toml"));
    std::fs::write(&path, text).expect("config");
    path
}

impl Server {
    /// Starts the binary on `dir` and waits until `/ready` answers 200.
    async fn start(dir: &Path, extra: &str) -> Server {
        let port = free_port();
        let config = write_config(dir, port, extra);
        let log = std::fs::File::create(dir.join(format!("server-{port}.log"))).expect("log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_adapterd"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting adapterd");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("server-{port}.log")));
                panic!(
                    "adapterd exited at start ({status}): {}",
                    log.unwrap_or_default()
                );
            }
            if let Ok(r) = client.get(format!("{base}/ready")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "adapterd not ready in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Server {
            child,
            base,
            client,
        }
    }

    fn kill9(mut self) {
        // std's Child::kill sends SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn upload(
        &self,
        name: &str,
        config: Vec<u8>,
        weights: Vec<u8>,
    ) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(format!("{}/v1/adapters", self.base))
            .multipart(adapter_form(name, config, weights))
            .send()
            .await
    }

    async fn get_json(&self, path: &str) -> Value {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET answered");
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.expect("JSON body")
    }

    async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("POST answered");
        let status = r.status().as_u16();
        (status, r.json().await.expect("JSON body"))
    }

    /// Sends SIGTERM and waits (15 s at most) for the exit status.
    fn sigterm_and_wait(&mut self) -> std::process::ExitStatus {
        let sent = self.sigterm();
        self.wait_exit(sent)
    }

    /// Sends SIGTERM; returns the moment just before, from which deadlines count.
    fn sigterm(&self) -> Instant {
        let pid = self.child.id().to_string();
        let sent = Instant::now();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success());
        sent
    }

    /// The exit status, which must come within 15 s of the SIGTERM `sent`.
    fn wait_exit(&mut self, sent: Instant) -> std::process::ExitStatus {
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                sent.elapsed() < Duration::from_secs(15),
                "adapterd still running 15 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn generate(&self, body: Value) -> (u16, Value) {
        self.post_json("/v1/generate", &body).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256_hex(config: &[u8], weights: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(config);
    h.update(weights);
    hex::encode(h.finalize())
}

/// (name, version) -> sha256 of every upload the server acknowledged with 201.
type Acked = Arc<Mutex<BTreeMap<(String, i64), String>>>;

async fn upload_loop(server: Arc<Server>, acked: Acked, worker: u64) {
    for i in 0u64.. {
        let name = ["alpha", "beta", "gamma"][(i % 3) as usize];
        let (config, weights) = tiny_adapter_files(worker * 10_000 + i, 2.0);
        let sha = sha256_hex(&config, &weights);
        let Ok(resp) = server.upload(name, config, weights).await else {
            return; // the server is gone
        };
        if resp.status() != 201 {
            continue;
        }
        let Ok(v) = resp.json::<Value>().await else {
            return;
        };
        assert_eq!(
            v["sha256"],
            sha.as_str(),
            "the acknowledged sha256 is the upload's"
        );
        let version = v["version"].as_i64().expect("version");
        acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((name.to_owned(), version), sha);
    }
}

/// After a restart: every acknowledged version is listed with its sha256, every listed
/// version generates, and the store holds exactly the listed versions (no orphans, no temp
/// dirs).
async fn check_after_restart(server: &Server, dir: &Path, acked: &BTreeMap<(String, i64), String>) {
    let mut listed: BTreeMap<(String, i64), String> = BTreeMap::new();
    for name in ["alpha", "beta", "gamma"] {
        let r = server
            .client
            .get(format!("{}/v1/adapters/{name}", server.base))
            .send()
            .await
            .expect("show");
        if r.status() == 404 {
            continue;
        }
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("json");
        for ver in v["versions"].as_array().expect("versions") {
            let version = ver["version"].as_i64().expect("version");
            let sha = ver["sha256"].as_str().expect("sha").to_owned();
            listed.insert((name.to_owned(), version), sha);
        }
    }
    for (key, sha) in acked {
        assert_eq!(
            listed.get(key),
            Some(sha),
            "acknowledged upload {key:?} lost or changed after kill -9"
        );
    }
    for (name, version) in listed.keys() {
        let (status, v) = server
            .generate(json!({"prompt": "the cat", "adapter_id": format!("{name}@{version}"), "max_new_tokens": 2}))
            .await;
        assert_eq!(
            status, 200,
            "{name}@{version} is listed but does not load: {v}"
        );
    }
    let tenant_dir = dir.join("adapters").join("default");
    for name in ["alpha", "beta", "gamma"] {
        let Ok(entries) = std::fs::read_dir(tenant_dir.join(name)) else {
            continue;
        };
        for e in entries.flatten() {
            let entry = e.file_name().to_string_lossy().into_owned();
            let version: i64 = entry
                .parse()
                .unwrap_or_else(|_| panic!("{name}/{entry} survived the start-up reconcile"));
            assert!(
                listed.contains_key(&(name.to_owned(), version)),
                "orphan version dir {name}/{entry} survived the start-up reconcile"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_uploads_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny_model(&dir.path().join("tiny"), 7);
    let seed: u64 = std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("FAULTS_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let acked: Acked = Arc::default();
    for round in 0..3 {
        let server = Arc::new(Server::start(dir.path(), "").await);
        if round > 0 {
            let snapshot = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
            check_after_restart(&server, dir.path(), &snapshot).await;
        }
        let workers: Vec<_> = (0..2)
            .map(|w| tokio::spawn(upload_loop(server.clone(), acked.clone(), round * 2 + w)))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        let pid = server.child.id().to_string();
        let killed = Command::new("kill").args(["-9", &pid]).status();
        assert!(killed.is_ok_and(|s| s.success()), "kill -9 {pid}");
        for w in workers {
            let _ = w.await;
        }
        drop(server); // reaps the child
    }
    let server = Server::start(dir.path(), "").await;
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(!acked.is_empty(), "no upload was acknowledged at all");
    eprintln!("{} acknowledged uploads survived 3 kill -9s", acked.len());
    check_after_restart(&server, dir.path(), &acked).await;
    drop(server);

    // The database opens, is in WAL mode and passes SQLite's integrity check.
    let db = adapterd::store::connect(&format!(
        "sqlite://{}",
        dir.path().join("adapterd.db").display()
    ))
    .await
    .expect("the database opens");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&db)
        .await
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    let ok: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&db)
        .await
        .expect("integrity_check");
    assert_eq!(ok, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_adapter_file_fails_only_that_adapter() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny_model(&dir.path().join("tiny"), 7);
    let server = Server::start(dir.path(), "").await;
    for (name, seed) in [("good", 1), ("bad", 2)] {
        let (c, w) = tiny_adapter_files(seed, 2.0);
        assert_eq!(
            server.upload(name, c, w).await.expect("upload").status(),
            201
        );
    }
    server.kill9();
    // Damage both stored copies of the weights (the upload and the serving copy a cold load
    // reads first) while the server is down (the cache is gone with it).
    for file in ["adapter_model.safetensors", "serving.safetensors"] {
        let weights = dir.path().join("adapters/default/bad/1").join(file);
        let len = std::fs::metadata(&weights).expect("stored weights").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&weights)
            .and_then(|f| f.set_len(len / 2))
            .expect("truncate");
    }

    let server = Server::start(dir.path(), "").await;
    let (status, v) = server
        .generate(json!({"prompt": "hi", "adapter_id": "bad", "max_new_tokens": 2}))
        .await;
    assert_eq!(status, 500, "{v}");
    assert_eq!(v["error"]["code"], "adapter_damaged", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap_or("").contains("bad"),
        "{v}"
    );
    for body in [
        json!({"prompt": "hi", "adapter_id": "good", "max_new_tokens": 2}),
        json!({"prompt": "hi", "max_new_tokens": 2}),
    ] {
        let (status, v) = server.generate(body).await;
        assert_eq!(status, 200, "{v}");
    }
    // Asking again gives the same clear error, and the server is still up.
    let (status, v) = server
        .generate(json!({"prompt": "hi", "adapter_id": "bad@1", "max_new_tokens": 2}))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (500, Some("adapter_damaged"))
    );
    let r = server
        .client
        .get(format!("{}/health", server.base))
        .send()
        .await;
    assert_eq!(r.expect("health").status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_a_stream_in_flight_cleanly_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_long_context_model(&dir.path().join("tiny"));
    let mut server = Server::start(
        dir.path(),
        "shutdown_grace_seconds = 1\n[engine]\nmax_new_tokens_limit = 65000\n",
    )
    .await;
    let resp = server
        .client
        .post(format!("{}/v1/generate", server.base))
        .json(&json!({"prompt": "hi", "stream": true, "ignore_eos": true, "max_new_tokens": 64000}))
        .send()
        .await
        .expect("stream starts");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first event").expect("bytes");
    assert!(
        first.starts_with(b"data:"),
        "{:?}",
        String::from_utf8_lossy(&first)
    );

    let sent = server.sigterm();

    // The stream ends — finished, or cut with a last error event — without a broken body.
    let last = last_event(&mut body, Duration::from_secs(15)).await;
    eprintln!("last event after SIGTERM: {last}");
    assert!(
        last.contains("finish_reason")
            || (last.contains("event: error") && last.contains("shutting_down")),
        "the stream's last event: {last}"
    );
    let status = server.wait_exit(sent);
    assert!(status.success(), "exit status {status}");
    assert!(
        sent.elapsed() < Duration::from_secs(8),
        "took {:?}",
        sent.elapsed()
    );
}

/// An SFT job long enough to be interrupted mid-way on the tiny model.
fn long_sft_job(name: &str, steps: usize, checkpoint_every: usize) -> Value {
    json!({
        "method": "sft",
        "adapter_name": name,
        "training_data": [
            {"prompt": "ab", "completion": "xyz"},
            {"prompt": "cd", "completion": "uvw"},
        ],
        "hyperparameters": {"rank": 4, "alpha": 8, "learning_rate": 0.01, "batch_size": 2,
                            "max_steps": steps, "warmup_steps": 0, "lr_scheduler": "constant",
                            "seed": 5, "checkpoint_every": checkpoint_every},
    })
}

/// Polls the job until `done(job)` holds (60 s at most) and returns it.
async fn wait_job(server: &Server, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let job = server.get_json(&format!("/v1/finetune/{id}")).await;
        if done(&job) {
            return job;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "waited 60 s for {what}; job: {job}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The messages of every event of a job, oldest first.
async fn job_messages(server: &Server, id: &str) -> Vec<String> {
    let page = server
        .get_json(&format!("/v1/finetune/{id}/events?limit=10000"))
        .await;
    page["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect()
}

/// The step number at the end of the first message starting with `prefix`.
fn step_in(messages: &[String], prefix: &str) -> Option<usize> {
    messages.iter().find_map(|m| {
        let rest = m.strip_prefix(prefix)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
    })
}

/// After a restart the job finishes, its adapter is listed and generates.
async fn finishes_and_serves(server: &Server, id: &str, name: &str) {
    let done = wait_job(server, id, "the resumed job to finish", |j| {
        j["status"] != "running" && j["status"] != "queued"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let adapter = server.get_json(&format!("/v1/adapters/{name}")).await;
    assert_eq!(adapter["source"], "finetune", "{adapter}");
    let (status, out) = server
        .generate(
            json!({"prompt": "ab", "adapter_id": name, "max_new_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_job_resumes_from_the_last_checkpoint_and_finishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny_model(&dir.path().join("tiny"), 7);
    let server = Server::start(dir.path(), "").await;
    let (status, job) = server
        .post_json("/v1/finetune", &long_sft_job("survivor", 2000, 10))
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_owned();
    wait_job(&server, &id, "step 25", |j| {
        j["progress"]["step"].as_u64().unwrap_or(0) >= 25
    })
    .await;
    server.kill9();

    let server = Server::start(dir.path(), "").await;
    finishes_and_serves(&server, &id, "survivor").await;
    let messages = job_messages(&server, &id).await;
    let resumed = step_in(&messages, "resumed from the checkpoint at step ")
        .unwrap_or_else(|| panic!("no resume event: {messages:?}"));
    assert!(
        resumed >= 20 && resumed.is_multiple_of(10),
        "resumed at {resumed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_job_checkpoints_where_it_stopped_and_resumes_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny_model(&dir.path().join("tiny"), 7);
    // checkpoint_every is larger than the whole job: only the shutdown writes one.
    let mut server = Server::start(dir.path(), "shutdown_grace_seconds = 5\n").await;
    let (status, job) = server
        .post_json("/v1/finetune", &long_sft_job("paused", 2000, 5000))
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_owned();
    wait_job(&server, &id, "step 15", |j| {
        j["progress"]["step"].as_u64().unwrap_or(0) >= 15
    })
    .await;
    let exit = server.sigterm_and_wait();
    assert!(exit.success(), "exit status {exit}");
    drop(server);

    let server = Server::start(dir.path(), "").await;
    finishes_and_serves(&server, &id, "paused").await;
    let messages = job_messages(&server, &id).await;
    let paused = step_in(&messages, "paused for shutdown after step ")
        .unwrap_or_else(|| panic!("no pause event: {messages:?}"));
    let resumed = step_in(&messages, "resumed from the checkpoint at step ")
        .unwrap_or_else(|| panic!("no resume event: {messages:?}"));
    assert!(paused >= 15, "paused at {paused}");
    assert_eq!(resumed, paused, "{messages:?}");
}
