//! The fine-tuning job runner: claims queued jobs one at a time, trains them on the shared
//! frozen base in its own bounded thread pool (so serving keeps its cores), records progress
//! and events per step, checkpoints, honours cancellation between steps, and on success
//! registers the adapter through the adapter store, where it serves at once. On start-up, jobs
//! a dead process left `running` are queued again and resume from their last checkpoint.
//!
//! Tests drive it deterministically with [`JobRunner::run_pending_jobs`] (with the background
//! loop off: `finetune.autostart = false`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::SqlitePool;

use crate::adapters::{now_rfc3339, AdapterError, AdapterRegistry, CONFIG_FILE, WEIGHTS_FILE};
use crate::engine::model::Llama;
use crate::engine::tokenizer::Tokenizer;
use crate::engine::train::checkpoint::Checkpoint;
use crate::engine::train::data::{self, DatasetError, DatasetLimits, Examples, Method};
use crate::engine::train::{Hyper, StepReport, Trainer};
use crate::store::jobs::{self as q, JobRow};

/// What a job row's `request` column holds: everything needed to (re)start it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobSpec {
    pub method: Method,
    pub adapter_name: String,
    pub hyperparameters: Hyper,
}

/// Parses and tokenizes a JSONL dataset for `hyper` — the same path for the API (at
/// submission, so errors are 422s with line numbers), the runner and `adapterd finetune`.
pub fn prepare_examples(
    jsonl: &[u8],
    hyper: &Hyper,
    tokenizer: &Tokenizer,
    limits: &DatasetLimits,
) -> Result<Examples, DatasetError> {
    let records = data::parse_jsonl(jsonl, hyper.method, limits)?;
    data::tokenize(&records, tokenizer, hyper.max_seq_len)
}

/// sha256 hex of the dataset bytes (the job's data lineage).
pub fn dataset_sha256(jsonl: &[u8]) -> String {
    hex::encode(Sha256::digest(jsonl))
}

pub struct JobRunner {
    db: SqlitePool,
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    adapters: Arc<AdapterRegistry>,
    base_name: String,
    jobs_dir: PathBuf,
    pool: Arc<rayon::ThreadPool>,
    dataset_limits: DatasetLimits,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    wake: tokio::sync::Notify,
    /// Set at shutdown: the running job checkpoints and stops at its next step boundary, and no
    /// further job is claimed.
    stopping: Arc<AtomicBool>,
    /// One job trains at a time; `run_pending_jobs` and the background loop share this.
    busy: tokio::sync::Mutex<()>,
}

/// How a job's training loop ended.
enum Outcome {
    Finished(Box<Trainer>),
    Cancelled(usize),
    /// Stopped for shutdown after this step, with a checkpoint of it; resumes on restart.
    Paused(usize),
}

impl JobRunner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: SqlitePool,
        model: Arc<Llama>,
        tokenizer: Arc<Tokenizer>,
        adapters: Arc<AdapterRegistry>,
        base_name: String,
        jobs_dir: PathBuf,
        threads: usize,
        nice: i32,
        dataset_limits: DatasetLimits,
    ) -> anyhow::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("adapterd-train-{i}"))
            .start_handler(move |_| lower_priority(nice))
            .build()
            .context("building the training thread pool")?;
        let pool = Arc::new(pool);
        Ok(Self {
            db,
            model,
            tokenizer,
            adapters,
            base_name,
            jobs_dir,
            pool,
            dataset_limits,
            cancels: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            stopping: Arc::new(AtomicBool::new(false)),
            busy: tokio::sync::Mutex::new(()),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Start-up: jobs left `running` by a dead process go back to the queue (they resume from
    /// their checkpoint when claimed).
    pub async fn recover(&self) -> anyhow::Result<()> {
        for id in q::requeue_interrupted(&self.db).await? {
            tracing::warn!(job = %id, "resuming a job interrupted by a restart");
            self.event(
                &id,
                "warning",
                "the server restarted while this job ran; it will resume from its last checkpoint",
                None,
            )
            .await;
        }
        self.record_gauges().await;
        Ok(())
    }

    /// Runs the background loop: a job whenever one is queued.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            while !me.stopping.load(Ordering::SeqCst) {
                match me.run_pending_jobs().await {
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "job runner"),
                }
                // Woken by a submission; the timeout is only a safety net.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), me.wake.notified())
                    .await;
            }
        });
    }

    /// Tells the loop a job was queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Stops a running job at its next step boundary.
    pub fn request_cancel(&self, id: &str) {
        if let Ok(map) = self.cancels.lock() {
            if let Some(flag) = map.get(id) {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }

    /// For shutdown: claims no further job, and has the running one (if any) write a checkpoint
    /// and stop at its next step boundary, leaving it `running` so the next start queues it
    /// again and it resumes from there. Resolves once no job is training.
    pub async fn pause(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let _idle = self.busy.lock().await;
    }

    /// Runs queued jobs until none is left; returns how many ran.
    pub async fn run_pending_jobs(&self) -> anyhow::Result<usize> {
        let _busy = self.busy.lock().await;
        let mut n = 0;
        while !self.stopping.load(Ordering::SeqCst) {
            let Some((row, dataset)) = q::claim_next(&self.db, &now_rfc3339()).await? else {
                break;
            };
            n += 1;
            self.record_gauges().await;
            let id = row.id.clone();
            if let Err(e) = self.run_job(row, dataset).await {
                let reason = format!("{e:#}");
                tracing::error!(job = %id, error = %reason, "fine-tuning job failed");
                self.event(&id, "error", &format!("failed: {reason}"), None)
                    .await;
                q::finish(&self.db, &id, "failed", Some(&reason), None, &now_rfc3339()).await?;
            }
            if let Ok(mut map) = self.cancels.lock() {
                map.remove(&id);
            }
            self.record_gauges().await;
        }
        Ok(n)
    }

    async fn event(&self, job: &str, level: &str, message: &str, data: Option<&str>) {
        let kind = if data.is_some() { "metrics" } else { "message" };
        if let Err(e) =
            q::add_event(&self.db, job, &now_rfc3339(), level, kind, message, data).await
        {
            tracing::error!(job, error = %e, "recording a job event");
        }
    }

    async fn record_gauges(&self) {
        if let Ok(counts) = q::count_by_status(&self.db).await {
            for status in ["queued", "running", "succeeded", "failed", "cancelled"] {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == status)
                    .map_or(0, |(_, n)| *n);
                metrics::gauge!(crate::metrics::FINETUNE_JOBS, "status" => status).set(n as f64);
            }
        }
    }

    fn checkpoint_path(&self, id: &str) -> PathBuf {
        self.jobs_dir.join(id).join("checkpoint.safetensors")
    }

    async fn run_job(&self, row: JobRow, dataset: Vec<u8>) -> anyhow::Result<()> {
        let spec: JobSpec =
            serde_json::from_str(&row.request).context("the stored job request is unreadable")?;
        let examples = prepare_examples(
            &dataset,
            &spec.hyperparameters,
            &self.tokenizer,
            &self.dataset_limits,
        )
        .map_err(|e| anyhow::anyhow!("dataset: {e}"))?;
        let n_examples = examples.len();
        let mut trainer = Trainer::new(self.model.clone(), spec.hyperparameters.clone(), examples)?;
        let ck_path = self.checkpoint_path(&row.id);
        if row.checkpoint_path.is_some() && ck_path.exists() {
            Checkpoint::load(&ck_path)
                .and_then(|ck| trainer.restore(&ck))
                .context("cannot resume from the last checkpoint")?;
            self.event(
                &row.id,
                "info",
                &format!(
                    "resumed from the checkpoint at step {}",
                    trainer.steps_done()
                ),
                None,
            )
            .await;
        } else {
            self.event(
                &row.id,
                "info",
                &format!(
                    "training started: {} examples, {} steps",
                    n_examples,
                    trainer.total_steps()
                ),
                None,
            )
            .await;
        }
        std::fs::create_dir_all(self.jobs_dir.join(&row.id))?;

        let cancel = Arc::new(AtomicBool::new(false));
        if let Ok(mut map) = self.cancels.lock() {
            map.insert(row.id.clone(), cancel.clone());
        }
        let outcome = self
            .train(&row, trainer, cancel.clone(), ck_path.clone())
            .await?;
        let trainer = match outcome {
            Outcome::Paused(step) => {
                self.event(
                    &row.id,
                    "info",
                    &format!(
                        "paused for shutdown after step {step}; it resumes from there on restart"
                    ),
                    None,
                )
                .await;
                return Ok(());
            }
            Outcome::Cancelled(step) => {
                self.event(
                    &row.id,
                    "info",
                    &format!("cancelled after step {step}"),
                    None,
                )
                .await;
                return Ok(());
            }
            Outcome::Finished(t) => t,
        };

        // The adapter goes through the same validation and atomic store as an upload.
        let adapter = trainer.adapter()?;
        let out = self.jobs_dir.join(&row.id).join("adapter");
        let (config, weights) = {
            let out = out.clone();
            let base = self.base_name.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
                crate::engine::lora::peft::save_peft(&adapter, &base, &out)?;
                Ok((
                    std::fs::read(out.join(CONFIG_FILE))?,
                    std::fs::read(out.join(WEIGHTS_FILE))?,
                ))
            })
            .await??
        };
        if cancel.load(Ordering::SeqCst) || self.is_cancelled(&row.id).await {
            self.event(
                &row.id,
                "info",
                "cancelled before the adapter was registered",
                None,
            )
            .await;
            return Ok(());
        }
        // Registering also marks the job succeeded, in one transaction with the adapter's row.
        let created = self
            .adapters
            .create(
                &row.tenant,
                &spec.adapter_name,
                config,
                weights,
                "finetune",
                Some(row.id.clone()),
            )
            .await;
        let version = match created {
            Ok(c) => c.row.version,
            Err(AdapterError::JobNotRunning(_)) => {
                self.event(
                    &row.id,
                    "info",
                    "cancelled while the adapter was being registered; it was not published",
                    None,
                )
                .await;
                let _ = std::fs::remove_dir_all(self.jobs_dir.join(&row.id));
                return Ok(());
            }
            Err(e) => return Err(anyhow::Error::new(e).context("registering the trained adapter")),
        };
        self.event(
            &row.id,
            "info",
            &format!("succeeded: adapter {}@{version} is live", spec.adapter_name),
            None,
        )
        .await;
        let _ = std::fs::remove_dir_all(self.jobs_dir.join(&row.id));
        Ok(())
    }

    async fn is_cancelled(&self, id: &str) -> bool {
        matches!(q::get_by_id(&self.db, id).await, Ok(Some(r)) if r.status == "cancelled")
    }

    /// The step loop, on the training pool; progress is written to the database between steps.
    async fn train(
        &self,
        row: &JobRow,
        mut trainer: Trainer,
        cancel: Arc<AtomicBool>,
        ck_path: PathBuf,
    ) -> anyhow::Result<Outcome> {
        let handle = tokio::runtime::Handle::current();
        let db = self.db.clone();
        let id = row.id.clone();
        let method = match trainer.hyper().method {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
        };
        let every = trainer.hyper().checkpoint_every;
        let pool = self.pool.clone();
        let stopping = self.stopping.clone();
        // The pool's threads do the tensor work; this blocking thread only waits on them.
        let job = move || -> anyhow::Result<Outcome> {
            let mut recent: Vec<f64> = Vec::new();
            while !trainer.is_done() {
                let cancelled_in_db = handle
                    .block_on(q::get_by_id(&db, &id))
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.status == "cancelled");
                if cancel.load(Ordering::SeqCst) || cancelled_in_db {
                    return Ok(Outcome::Cancelled(trainer.steps_done()));
                }
                if stopping.load(Ordering::SeqCst) {
                    let step = trainer.steps_done();
                    if step > 0 && !step.is_multiple_of(every) {
                        trainer.save_checkpoint(&ck_path)?;
                        handle.block_on(q::set_checkpoint(
                            &db,
                            &id,
                            &ck_path.display().to_string(),
                        ))?;
                    }
                    return Ok(Outcome::Paused(step));
                }
                let report = pool.install(|| trainer.step())?;
                recent.push(report.seconds);
                if recent.len() > 10 {
                    recent.remove(0);
                }
                let step_seconds = recent.iter().sum::<f64>() / recent.len() as f64;
                let remaining = report.total_steps - report.step;
                let metrics_json = step_metrics(&report, step_seconds * remaining as f64);
                metrics::counter!(crate::metrics::FINETUNE_STEPS_TOTAL, "method" => method)
                    .increment(1);
                metrics::counter!(crate::metrics::FINETUNE_TOKENS_TOTAL)
                    .increment(report.tokens as u64);
                metrics::histogram!(crate::metrics::FINETUNE_STEP_SECONDS).record(report.seconds);
                let text = metrics_json.to_string();
                handle.block_on(async {
                    q::record_progress(
                        &db,
                        &id,
                        report.step as i64,
                        report.total_steps as i64,
                        &text,
                    )
                    .await?;
                    q::add_event(
                        &db,
                        &id,
                        &now_rfc3339(),
                        "info",
                        "metrics",
                        &format!(
                            "step {}/{}: loss {:.4}",
                            report.step, report.total_steps, report.loss
                        ),
                        Some(&text),
                    )
                    .await
                })?;
                if report.step % every == 0 && !trainer.is_done() {
                    trainer.save_checkpoint(&ck_path)?;
                    handle.block_on(async {
                        q::set_checkpoint(&db, &id, &ck_path.display().to_string()).await?;
                        q::add_event(
                            &db,
                            &id,
                            &now_rfc3339(),
                            "info",
                            "message",
                            &format!("checkpoint saved at step {}", report.step),
                            None,
                        )
                        .await
                    })?;
                }
            }
            Ok(Outcome::Finished(Box::new(trainer)))
        };
        tokio::task::spawn_blocking(job)
            .await
            .context("the training thread")?
    }
}

/// Lowers the calling thread's scheduling priority (Linux: the nice value is per thread), so
/// when training and serving compete for cores the scheduler favours serving; an idle machine
/// still gives training all the time it wants.
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice > 0 {
        // SAFETY: setpriority has no memory-safety preconditions; `who = 0` is this thread.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if rc != 0 {
            tracing::warn!(nice, "could not lower the training threads' priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// The per-step metrics a job shows and its events carry.
fn step_metrics(r: &StepReport, eta_seconds: f64) -> Value {
    let mut m = json!({
        "step": r.step,
        "total_steps": r.total_steps,
        "epoch": r.epoch,
        "loss": r.loss,
        "learning_rate": r.learning_rate,
        "grad_norm": r.grad_norm,
        "tokens_per_s": r.tokens_per_s,
        "step_seconds": r.seconds,
        "eta_seconds": eta_seconds,
    });
    if let (Some(d), Some(obj)) = (r.dpo, m.as_object_mut()) {
        obj.insert("reward_margin".into(), json!(d.reward_margin));
        obj.insert("reward_accuracy".into(), json!(d.reward_accuracy));
        obj.insert("chosen_reward".into(), json!(d.chosen_reward));
        obj.insert("rejected_reward".into(), json!(d.rejected_reward));
    }
    m
}
