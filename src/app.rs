//! `Application::build(settings)`: refuses a non-loopback bind with auth off (unless insecure),
//! binds the listener (port 0 works; `port()` tells which) and answers on it at once — `/health`
//! 200, the rest 503 — while it opens the database, resolves and loads the model and starts the
//! engine thread. `run` serves the API until the shutdown future resolves. `main` and the
//! integration tests share this path.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;

use crate::adapters::AdapterRegistry;
use crate::api::{self, AppState, ServedModel};
use crate::config::Settings;
use crate::engine::lora::peft::LoraLimits;
use crate::engine::train::data::DatasetLimits;
use crate::engine::{self, scheduler};
use crate::jobs::JobRunner;

/// After the shutdown cut, how long connections get to deliver their last bytes and close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

pub struct Application {
    listener: TcpListener,
    router: Router,
    addr: SocketAddr,
    auth: bool,
    pub db: sqlx::SqlitePool,
    /// The fine-tuning job runner (tests call `run_pending_jobs` on it).
    pub jobs: Arc<JobRunner>,
    /// Ends requests still in flight when the shutdown grace period is over.
    cut: api::limits::Cut,
    shutdown_grace: Duration,
    /// `server.header_timeout_seconds`: each request's headers (and keep-alive idleness).
    header_timeout: Duration,
    /// `/metrics` on its own listener (`server.metrics_bind`).
    metrics: Option<(TcpListener, Router)>,
}

/// The model path to serve: the configured one, or the default model (fetched if missing).
pub fn resolve_model_path(settings: &Settings) -> anyhow::Result<PathBuf> {
    if settings.model.path.is_empty() {
        crate::model_fetch::ensure_default_model(settings.model_cache_dir())
    } else {
        let p = PathBuf::from(&settings.model.path);
        anyhow::ensure!(p.exists(), "model path {} does not exist", p.display());
        Ok(p)
    }
}

/// What start-up builds behind the listener: the API and what `run` needs to stop it.
struct Assembled {
    router: Router,
    /// `/metrics` for its own listener (`server.metrics_bind`), when there is one.
    metrics_router: Option<Router>,
    db: sqlx::SqlitePool,
    jobs: Arc<JobRunner>,
    cut: api::limits::Cut,
}

/// Opens the database, loads the model, reconciles the adapter store, recovers interrupted
/// jobs, starts the engine thread and builds the API router.
async fn assemble(settings: &Settings, separate_metrics: bool) -> anyhow::Result<Assembled> {
    let db = crate::store::connect(&settings.storage.database_url).await?;
    if settings.auth.enabled && crate::store::keys::count_active(&db).await? == 0 {
        tracing::warn!(
            "auth is on but no API key exists: every /v1 request will get 401; \
             create one with `adapterd keys create --tenant NAME`"
        );
    }
    std::fs::create_dir_all(&settings.storage.adapters_dir).with_context(|| {
        format!(
            "creating adapters directory {}",
            settings.storage.adapters_dir
        )
    })?;

    let s = settings.clone();
    let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let path = resolve_model_path(&s)?;
        tracing::info!(model = %path.display(), "loading model");
        let started = std::time::Instant::now();
        let device = s.device_spec()?.resolve().map_err(anyhow::Error::msg)?;
        let mut loaded = engine::load_model_with(&path, &device, s.kernels_for(&device)?)
            .with_context(|| format!("loading model {}", path.display()))?;
        loaded
            .model
            .set_activation_precision(s.activation_precision()?);
        tracing::info!(
            model = %loaded.name,
            layers = loaded.model.cfg.num_layers,
            device = %engine::device::describe(loaded.model.device()),
            kernels = ?loaded.model.kernels(),
            seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(loaded)
    })
    .await
    .context("model loading task")??;

    let context_len = loaded.model.cfg.max_position_embeddings;
    let a = &settings.adapters;
    let adapters = Arc::new(
        AdapterRegistry::new(
            db.clone(),
            PathBuf::from(&settings.storage.adapters_dir),
            loaded.model.cfg.clone(),
            LoraLimits {
                max_rank: a.max_rank,
                max_bytes: a.max_upload_bytes,
            },
            a.cache_bytes,
        )
        .with_quota(crate::adapters::AdapterQuota {
            max_versions: settings.limits.max_adapter_versions_per_tenant,
            max_bytes: settings.limits.max_adapter_bytes_per_tenant,
        })
        .with_device(loaded.model.device().clone())
        .with_precision(settings.adapter_precision()?),
    );
    if settings.adapter_precision()? == crate::engine::lora::int8::AdapterPrecision::Int8
        && !loaded.model.device().is_cpu()
    {
        tracing::warn!(
            "adapters.precision = \"int8\" applies on the CPU only; adapters on this GPU stay f32"
        );
    }
    adapters
        .reconcile()
        .await
        .context("reconciling the adapter store with the database")?;
    let name = if settings.model.name.is_empty() {
        loaded.name.clone()
    } else {
        settings.model.name.clone()
    };
    let tokenizer = Arc::new(loaded.tokenizer);
    let model = Arc::new(loaded.model);
    let device = engine::device::describe(model.device());
    let kernels = match model.kernels() {
        engine::model::Kernels::Native => "native",
        engine::model::Kernels::Portable => "portable",
    };
    let jobs = Arc::new(JobRunner::new(
        db.clone(),
        model.clone(),
        tokenizer.clone(),
        adapters.clone(),
        name.clone(),
        PathBuf::from(&settings.storage.jobs_dir),
        settings.finetune.threads,
        settings.finetune.nice,
        DatasetLimits {
            max_records: settings.datasets.max_records,
            max_bytes: settings.datasets.max_file_bytes,
        },
    )?);
    jobs.recover()
        .await
        .context("recovering fine-tuning jobs interrupted by a restart")?;
    if settings.finetune.autostart {
        jobs.start();
    }
    let e = &settings.engine;
    let engine = scheduler::spawn(
        model,
        tokenizer.clone(),
        scheduler::EngineConfig {
            max_running: e.max_running,
            max_waiting: e.max_waiting,
            max_step_tokens: e.max_step_tokens,
            prefix_cache_bytes: e.prefix_cache_bytes,
        },
    )
    .context("starting the engine thread")?;
    let limits = Arc::new(api::limits::TenantLimits::from_settings(settings));
    let state = AppState {
        engine,
        tokenizer,
        model: Arc::new(ServedModel {
            name,
            context_len,
            default_max_new_tokens: e.default_max_new_tokens,
            max_new_tokens_limit: e.max_new_tokens_limit,
            created: api::generation::unix_now(),
            device,
            kernels,
        }),
        metrics: crate::metrics::install(),
        adapters,
        db: db.clone(),
        datasets: settings.datasets.clone(),
        finetune: settings.finetune.clone(),
        jobs: jobs.clone(),
        auth: Arc::new(api::auth::Auth::new(settings.auth.enabled, db.clone())),
        limits: limits.clone(),
    };
    let metrics_router = separate_metrics.then(|| api::metrics_router(state.clone()));
    let router = api::router(
        state,
        settings.server.max_body_bytes,
        a.max_upload_bytes,
        !separate_metrics,
    );
    Ok(Assembled {
        router,
        metrics_router,
        db,
        jobs,
        cut: limits.cut.clone(),
    })
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        settings.check_exposure()?;
        let addr = settings.bind_addr()?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let metrics_listener = match settings.metrics_addr()? {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr} (server.metrics_bind)"))?,
            ),
            None => None,
        };
        let header_timeout = Duration::from_secs(settings.server.header_timeout_seconds);

        // The port answers from the start (a first run may spend a while fetching the default
        // model): `/health` says the process is alive, everything else gets 503 until the
        // model is loaded and the API takes the listener over.
        tracing::info!(%addr, "listening; starting up");
        let (assembled_tx, assembled_rx) = tokio::sync::oneshot::channel::<()>();
        let starting = crate::http_server::serve_until(
            &listener,
            api::starting_router(),
            header_timeout,
            async {
                let _ = assembled_rx.await;
            },
        );
        let assemble = async {
            let assembled = assemble(&settings, metrics_listener.is_some()).await;
            let _ = assembled_tx.send(());
            assembled
        };
        let (starting, assembled) = tokio::join!(starting, assemble);
        // Start-up responses asked their connections to close; idle ones close now.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLOSE_WAIT, starting.shutdown()).await;
        });
        let assembled = assembled?;
        Ok(Self {
            listener,
            router: assembled.router,
            addr,
            auth: settings.auth.enabled,
            db: assembled.db,
            jobs: assembled.jobs,
            cut: assembled.cut,
            shutdown_grace: Duration::from_secs(settings.server.shutdown_grace_seconds),
            header_timeout,
            metrics: metrics_listener.zip(assembled.metrics_router),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address `/metrics` is served on when it has its own listener.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests end
    /// for `server.shutdown_grace_seconds`; then ends those still running (503 or a last
    /// stream event, see `api::limits::deadline`) and returns once their connections close,
    /// or after [`CLOSE_WAIT`] more at most. Meanwhile a running fine-tuning job checkpoints
    /// at its next step boundary and stops (it resumes on restart).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.addr, auth = self.auth, "listening");
        let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
        if let Some((listener, router)) = self.metrics {
            tracing::info!(addr = ?listener.local_addr().ok(), "serving /metrics");
            // Scrapes are short; this listener just stops with the rest.
            let (header_timeout, shutdown) = (self.header_timeout, shutdown.clone());
            tokio::spawn(async move {
                crate::http_server::serve_until(&listener, router, header_timeout, shutdown).await
            });
        }
        let connections = crate::http_server::serve_until(
            &self.listener,
            self.router,
            self.header_timeout,
            shutdown,
        )
        .await;
        let started = std::time::Instant::now();
        // Connections drain and the running job (if any) checkpoints side by side, within the
        // same grace period.
        let jobs = self.jobs.clone();
        let paused = tokio::spawn(async move { jobs.pause().await });
        let drained = connections.shutdown();
        tokio::pin!(drained);
        let in_grace = tokio::time::timeout(self.shutdown_grace, &mut drained).await;
        if in_grace.is_err() {
            tracing::warn!(
                grace_seconds = self.shutdown_grace.as_secs(),
                "shutdown grace period over: ending the requests still in flight"
            );
            self.cut.cut();
            if tokio::time::timeout(CLOSE_WAIT, &mut drained)
                .await
                .is_err()
            {
                tracing::warn!("connections still open after the cut; exiting anyway");
            }
        }
        let left = self.shutdown_grace.saturating_sub(started.elapsed()) + CLOSE_WAIT;
        if tokio::time::timeout(left, paused).await.is_err() {
            tracing::warn!(
                "the running fine-tuning job did not reach a step boundary in time; \
                 it resumes from its last periodic checkpoint on restart"
            );
        }
        Ok(())
    }
}
