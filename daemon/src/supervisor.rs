//! The state owner: one task that holds the governor, the workers and every waiting request, receives
//! messages (requests, load results, worker exits, memory samples, ticks), asks the policy for a plan and
//! carries it out. It never blocks: loads run on their own threads, models on their workers.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};
use ult_policy::{
    Action, Event, EvictReason, Governor, GovernorConfig, KeepAlive, LeaseId, LoadPreview,
    MemorySnapshot, Plan, PressureLevel, Rejection, RequestId, RequestKind, Residency, Route,
    Router,
};

use crate::config::Config;
use crate::error::ServiceError;
use crate::probe::Prober;
use crate::registry::{RegisteredModel, Registry};
use crate::state_file::DesiredState;
use crate::worker::{JobSender, Worker};
use ult_engine::{Engine, EngineError, LoadedModel, ModelKind};

/// A change worth telling watchers about.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// A load started.
    Loading {
        /// The model.
        model: String,
        /// Its predicted footprint.
        predicted_bytes: u64,
    },
    /// Bytes read so far by a load.
    Progress {
        /// The model.
        model: String,
        /// Bytes read.
        loaded_bytes: u64,
        /// Bytes to read.
        total_bytes: u64,
    },
    /// A load finished.
    Loaded {
        /// The model.
        model: String,
        /// Wall time.
        load_ms: u64,
        /// Measured bytes.
        measured_bytes: u64,
        /// Predicted bytes (steady state).
        predicted_bytes: u64,
    },
    /// A load failed.
    LoadFailed {
        /// The model.
        model: String,
        /// Why.
        reason: String,
    },
    /// A model was unloaded.
    Evicted {
        /// The model.
        model: String,
        /// Why ("keep-alive", "make-room", …, or "crashed").
        reason: String,
        /// Bytes the ledger stops charging.
        freed_bytes: u64,
    },
    /// The pressure level changed.
    Pressure {
        /// The level.
        level: PressureLevel,
        /// Why.
        reason: String,
    },
    /// A KV budget changed.
    KvBudget {
        /// The model.
        model: String,
        /// Tokens per sequence.
        tokens: u32,
    },
    /// A model's prefix cache was dropped (shedding's first step).
    CacheDropped {
        /// The model.
        model: String,
        /// The bytes the cache held, as last reported.
        bytes: u64,
    },
}

/// A watch event with its wall-clock time.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The event.
    pub event: WatchEvent,
}

/// Permission to run on a resident model. Dropping it (for `Use` grants) tells the state owner the request
/// is done.
#[derive(Debug)]
pub struct Grant {
    /// The model.
    pub model: Arc<RegisteredModel>,
    /// Its worker's queue (None for `Load` grants).
    pub jobs: Option<JobSender>,
    /// Set when this request caused the load: how long it took.
    pub load_ms: Option<u64>,
    /// Models evicted to make room for that load.
    pub evicted: Vec<String>,
    /// Measured bytes of the model.
    pub measured_bytes: Option<u64>,
    _done: Option<DoneGuard>,
}

#[derive(Debug)]
struct DoneGuard {
    tx: mpsc::UnboundedSender<Msg>,
    model: String,
    keep_alive: Option<Option<KeepAlive>>,
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Done {
            model: std::mem::take(&mut self.model),
            keep_alive: self.keep_alive,
        });
    }
}

impl Grant {
    /// Once this request ends, the model stays resident for `keep_alive` when idle (Ollama's
    /// per-request `keep_alive`; 0 unloads it as soon as nothing else uses it), until another request
    /// sets its own. `None` restores the model's configured keep-alive.
    pub fn keep_alive_after(&mut self, keep_alive: Option<KeepAlive>) {
        if let Some(d) = &mut self._done {
            d.keep_alive = Some(keep_alive);
        }
    }
}

/// Sends `Cancel` when a waiting request is abandoned before its answer arrives.
struct CancelGuard {
    tx: mpsc::UnboundedSender<Msg>,
    id: RequestId,
    armed: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(Msg::Cancel { id: self.id });
        }
    }
}

/// The daemon's view of itself and every model, for `Status`.
#[derive(Debug, Clone)]
pub struct StatusView {
    /// Device: "cpu", "cuda:0", "metal:0".
    pub device: String,
    /// Size of the governed pool.
    pub pool_total_bytes: u64,
    /// The configured ceiling.
    pub ceiling_bytes: u64,
    /// The headroom.
    pub headroom_bytes: u64,
    /// Bytes charged to models holding memory.
    pub used_bytes: u64,
    /// Bytes a load could use without evicting.
    pub free_bytes: u64,
    /// What the OS reports as available.
    pub available_bytes: u64,
    /// The pressure level.
    pub pressure: PressureLevel,
    /// Why.
    pub pressure_reason: String,
    /// Time since start.
    pub uptime_ms: u64,
    /// Loads running or queued.
    pub loads_in_flight: u32,
    /// The latest sample.
    pub snapshot: Option<MemorySnapshot>,
    /// The probe source ("linux", "macos", "file").
    pub probe_source: String,
    /// The configured max resident models (0: none).
    pub max_resident: u32,
    /// Every model.
    pub models: Vec<ModelStatus>,
    /// Routes.
    pub routes: Vec<Route>,
}

/// One model in `Status`.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    /// The registered model.
    pub model: Arc<RegisteredModel>,
    /// The policy's view (None when the model could not be inspected).
    pub view: Option<ult_policy::ModelView>,
    /// Milliseconds since the epoch of the last use.
    pub last_used_unix_ms: Option<u64>,
    /// Counters accumulated over every load of this model.
    pub counters: Counters,
    /// The batch and the KV pool now (None unless resident).
    pub batch: Option<BatchView>,
    /// The last unload measured on the device: (bytes freed, bytes its load had measured).
    pub last_unload: Option<(u64, u64)>,
}

/// A resident decoder's running batch and KV block pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchView {
    /// Sequences in the running batch.
    pub running: u64,
    /// Sequences waiting for admission (new or preempted).
    pub waiting: u64,
    /// KV blocks held by sequences.
    pub kv_blocks_used: u64,
    /// KV blocks in the pool.
    pub kv_blocks_total: u64,
    /// Bytes the pool holds now (zero while released).
    pub kv_pool_bytes: u64,
    /// KV blocks the prefix cache keeps that no sequence holds.
    pub kv_cached_blocks: u64,
    /// Bytes of those blocks (the cache's share of the pool).
    pub kv_cached_bytes: u64,
    /// Sequences out of the batch because their client stopped reading.
    pub paused: u64,
    /// Times a sequence paused for its client, so far.
    pub pauses: u64,
}

impl BatchView {
    fn read(s: &crate::worker::WorkerStats) -> Self {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Self {
            running: r(&s.running),
            waiting: r(&s.waiting),
            kv_blocks_used: r(&s.kv_blocks_used),
            kv_blocks_total: r(&s.kv_blocks_total),
            kv_pool_bytes: r(&s.kv_bytes),
            kv_cached_blocks: r(&s.cached_blocks),
            kv_cached_bytes: r(&s.cached_bytes),
            paused: r(&s.paused),
            pauses: r(&s.pauses),
        }
    }
}

/// Cumulative request counters of one model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Prompt tokens processed.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Generations completed.
    pub completed: u64,
    /// Generations cancelled by their client.
    pub cancelled: u64,
    /// Requests that failed in the engine.
    pub failed: u64,
    /// Inputs embedded.
    pub embedded: u64,
    /// Sequences preempted (KV freed, recomputed later) to make room.
    pub preemptions: u64,
    /// Admissions that reused prefix-cache blocks.
    pub cache_hits: u64,
    /// Admissions that found nothing cached.
    pub cache_misses: u64,
    /// Prompt tokens served from the prefix cache (not computed).
    pub cache_tokens_saved: u64,
}

impl Counters {
    fn read(s: &crate::worker::WorkerStats) -> Self {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Self {
            prompt_tokens: r(&s.prompt_tokens),
            generated_tokens: r(&s.generated_tokens),
            completed: r(&s.completed),
            cancelled: r(&s.cancelled),
            failed: r(&s.failed),
            embedded: r(&s.embedded),
            preemptions: r(&s.preemptions),
            cache_hits: r(&s.cache_hits),
            cache_misses: r(&s.cache_misses),
            cache_tokens_saved: r(&s.cache_tokens_saved),
        }
    }

    fn add(self, o: Self) -> Self {
        Self {
            prompt_tokens: self.prompt_tokens + o.prompt_tokens,
            generated_tokens: self.generated_tokens + o.generated_tokens,
            completed: self.completed + o.completed,
            cancelled: self.cancelled + o.cancelled,
            failed: self.failed + o.failed,
            embedded: self.embedded + o.embedded,
            preemptions: self.preemptions + o.preemptions,
            cache_hits: self.cache_hits + o.cache_hits,
            cache_misses: self.cache_misses + o.cache_misses,
            cache_tokens_saved: self.cache_tokens_saved + o.cache_tokens_saved,
        }
    }
}

/// What an explicit unload did.
#[derive(Debug, Clone, Copy)]
pub struct Unloaded {
    /// False when it was not resident.
    pub unloaded: bool,
    /// Bytes the ledger stopped charging.
    pub freed_bytes: u64,
}

type Reply<T> = oneshot::Sender<Result<T, ServiceError>>;

enum Msg {
    Resolve {
        name: String,
        reply: Reply<Arc<RegisteredModel>>,
    },
    Acquire {
        id: RequestId,
        model: String,
        kind: RequestKind,
        reply: Reply<Grant>,
    },
    Cancel {
        id: RequestId,
    },
    Done {
        model: String,
        /// Set when the request chose the model's keep-alive from then on.
        keep_alive: Option<Option<KeepAlive>>,
    },
    Progress {
        model: String,
        loaded: u64,
        total: u64,
    },
    LoadFinished {
        model: String,
        result: Result<LoadedModelBox, EngineError>,
        measured_bytes: u64,
        load_ms: u64,
    },
    WorkerExited {
        /// Device bytes its model's drop freed (GPU only).
        freed: Option<u64>,
        model: String,
        crash: Option<EngineError>,
    },
    Snapshot(MemorySnapshot),
    Tick,
    Status {
        reply: Reply<StatusView>,
    },
    Unload {
        name: String,
        reply: Reply<Unloaded>,
    },
    Pin {
        id: RequestId,
        name: String,
        pin: bool,
        reply: Reply<String>,
    },
    Lease {
        id: RequestId,
        name: String,
        ttl_ms: u64,
        reply: Reply<(String, LeaseId, u64)>,
    },
    Release {
        lease: LeaseId,
        reply: Reply<bool>,
    },
    PlanLoad {
        name: String,
        reply: Reply<LoadPreview>,
    },
    Reload {
        registry: Arc<Registry>,
        reuse: BTreeMap<String, crate::registry::Reuse>,
        router: Router,
        model_roots: Vec<std::path::PathBuf>,
        reply: Reply<ReloadSummary>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

struct LoadedModelBox(LoadedModel);

impl std::fmt::Debug for LoadedModelBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadedModel")
    }
}

/// A handle for request handlers: every method is one message to the state owner. It also carries what
/// both front doors share: per-client limits and the shutdown signals.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
    /// The state owner's registry, which it swaps on a reload; request handlers read the current one.
    registry: SharedRegistry,
    /// What a reload needs: the configuration file, the engine to inspect with, and one reload at a time.
    reload: Arc<ReloadSource>,
    events: broadcast::Sender<Stamped>,
    next_id: Arc<AtomicU64>,
    load_wait: Duration,
    limits: Arc<crate::limits::ClientLimits>,
    work: Arc<crate::requests::RequestWork>,
    write_timeout: Duration,
    draining: Arc<std::sync::atomic::AtomicBool>,
    end_streams: Arc<tokio::sync::watch::Sender<bool>>,
    grace_ms: u64,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| ServiceError::ShuttingDown)?;
        rx.await.map_err(|_| ServiceError::ShuttingDown)?
    }

    /// The per-client limits.
    pub fn limits(&self) -> &Arc<crate::limits::ClientLimits> {
        &self.limits
    }

    /// Request preparation: its threads and its memory budget.
    pub fn work(&self) -> &Arc<crate::requests::RequestWork> {
        &self.work
    }

    /// How long a stream waits for a client that does not read before it is cancelled.
    pub fn write_timeout(&self) -> Duration {
        self.write_timeout
    }

    /// From now on, new requests are refused with `ShuttingDown`.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// True once draining began.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Ends every stream still running (they get `EndedByShutdown`).
    pub fn end_streams(&self) {
        let _ = self.end_streams.send(true);
    }

    /// A receiver that changes to `true` when streams must end.
    pub fn streams_end(&self) -> tokio::sync::watch::Receiver<bool> {
        self.end_streams.subscribe()
    }

    /// The shutdown grace period.
    pub fn grace_ms(&self) -> u64 {
        self.grace_ms
    }

    /// Requests running or waiting, over every model.
    pub async fn requests_in_flight(&self) -> u32 {
        match self.status().await {
            Ok(s) => s
                .models
                .iter()
                .filter_map(|m| m.view.as_ref())
                .map(|v| v.in_flight + v.queued)
                .sum(),
            Err(_) => 0,
        }
    }

    fn new_id(&self) -> RequestId {
        RequestId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The registry now (a reload swaps it).
    pub fn registry(&self) -> Arc<Registry> {
        self.registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the configuration file and rescans `model_dirs` (`ultctl reload`, SIGHUP): new models
    /// appear, removed ones unload once no request runs on them and are then unknown, changed ones
    /// reload on their next use (never mid-request). An invalid file is refused with its file, line and
    /// key, and nothing changes. Changes to `[daemon]` other than `model_dirs` and `model_roots` need a
    /// restart; they are logged and ignored. One reload runs at a time.
    pub async fn reload(&self) -> Result<ReloadSummary, ServiceError> {
        let _one = self.reload.lock.lock().await;
        let path = self.reload.file.clone();
        let engine = self.reload.engine.clone();
        let old = self.registry();
        let boot_daemon = self.reload.daemon.clone();
        let work = tokio::task::spawn_blocking(move || {
            let config = crate::config::Config::load(&path)?;
            if config.daemon.restart_settings() != boot_daemon.restart_settings() {
                tracing::warn!(
                    file = %path.display(),
                    "[daemon] settings changed: they take effect at the next restart (a reload applies models, routes, model_dirs and model_roots)"
                );
            }
            let router = config.router().map_err(|e| crate::config::ConfigError {
                file: path.clone(),
                line: 0,
                key: "routes".into(),
                message: e.to_string(),
            })?;
            let (registry, reuse) = Registry::inspect_reusing(&config, engine.as_ref(), &old);
            Ok::<_, crate::config::ConfigError>((registry, reuse, router, config.daemon.model_roots))
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("the reload task failed: {e}")))?;
        let (registry, reuse, router, model_roots) = work.map_err(|e| {
            tracing::error!(error = %e, "reload refused; the running configuration stays");
            ServiceError::InvalidConfig {
                message: e.to_string(),
            }
        })?;
        self.ask(|reply| Msg::Reload {
            registry: Arc::new(registry),
            reuse,
            router,
            model_roots,
            reply,
        })
        .await
    }

    /// Resolves a model name, alias or route to a configured model that can serve.
    pub async fn resolve(&self, name: &str) -> Result<Arc<RegisteredModel>, ServiceError> {
        // Store names hold '/' (`org/repo`, `namespace/model:tag`): only an unknown name is taken for a
        // path.
        let path_like = name.contains('/') || name.contains('\\') || name.starts_with('~');
        let known = || {
            let registry = self.registry();
            registry.get(name).is_some()
                || registry
                    .models
                    .values()
                    .any(|m| m.config.aliases.iter().any(|a| a == name))
        };
        if path_like && !known() {
            return Err(ServiceError::PathNotAllowed {
                name: name.to_string(),
            });
        }
        let name = name.to_string();
        self.ask(|reply| Msg::Resolve { name, reply }).await
    }

    /// Waits until `model` is resident and admits this request (loading it, and evicting others, if the
    /// policy says so). Gives up after the configured wait with `WaitTimeout`.
    pub async fn acquire(&self, model: &str, kind: RequestKind) -> Result<Grant, ServiceError> {
        if self.is_draining() {
            return Err(ServiceError::ShuttingDown);
        }
        let id = self.new_id();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Acquire {
                id,
                model: model.to_string(),
                kind,
                reply,
            })
            .map_err(|_| ServiceError::ShuttingDown)?;
        let mut cancel = CancelGuard {
            tx: self.tx.clone(),
            id,
            armed: true,
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.load_wait, rx).await;
        cancel.armed = false;
        match result {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ServiceError::ShuttingDown),
            Err(_) => {
                let _ = self.tx.send(Msg::Cancel { id });
                Err(ServiceError::WaitTimeout {
                    model: model.to_string(),
                    waited_ms: started.elapsed().as_millis() as u64,
                })
            }
        }
    }

    /// The daemon's status.
    pub async fn status(&self) -> Result<StatusView, ServiceError> {
        self.ask(|reply| Msg::Status { reply }).await
    }

    /// Unloads a model explicitly.
    pub async fn unload(&self, name: &str) -> Result<Unloaded, ServiceError> {
        let name = name.to_string();
        self.ask(|reply| Msg::Unload { name, reply }).await
    }

    /// Pins (`pin = true`) or unpins a model; returns the resolved name.
    pub async fn pin(&self, name: &str, pin: bool) -> Result<String, ServiceError> {
        let (name, id) = (name.to_string(), self.new_id());
        self.ask(|reply| Msg::Pin {
            id,
            name,
            pin,
            reply,
        })
        .await
    }

    /// Leases a model for `ttl_ms`.
    pub async fn lease(
        &self,
        name: &str,
        ttl_ms: u64,
    ) -> Result<(String, LeaseId, u64), ServiceError> {
        let (name, id) = (name.to_string(), self.new_id());
        self.ask(|reply| Msg::Lease {
            id,
            name,
            ttl_ms,
            reply,
        })
        .await
    }

    /// Releases a lease.
    pub async fn release(&self, lease: LeaseId) -> Result<bool, ServiceError> {
        self.ask(|reply| Msg::Release { lease, reply }).await
    }

    /// What loading a model would do.
    pub async fn plan_load(&self, name: &str) -> Result<LoadPreview, ServiceError> {
        let name = name.to_string();
        self.ask(|reply| Msg::PlanLoad { name, reply }).await
    }

    /// Watch events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Stamped> {
        self.events.subscribe()
    }

    /// Stops the state owner: workers finish what they run and drop their models.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Shutdown { reply }).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The registry the state owner publishes to its handles.
type SharedRegistry = Arc<std::sync::RwLock<Arc<Registry>>>;

/// What [`Handle::reload`] reads.
struct ReloadSource {
    file: std::path::PathBuf,
    engine: Arc<dyn Engine>,
    /// `[daemon]` as the daemon started with it.
    daemon: crate::config::DaemonConfig,
    lock: tokio::sync::Mutex<()>,
}

/// What a reload changed, by model name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Models that appeared.
    pub added: Vec<String>,
    /// Models that are gone (unloaded once idle).
    pub removed: Vec<String>,
    /// Models whose files or serving configuration changed (reloaded on next use).
    pub reloaded: Vec<String>,
    /// Models whose settings changed in place.
    pub updated: Vec<String>,
    /// Models left as they were.
    pub unchanged: usize,
}

struct Waiter {
    model: String,
    kind: RequestKind,
    reply: Reply<Grant>,
}

struct Supervisor {
    governor: Governor,
    router: Router,
    registry: Arc<Registry>,
    /// Where `registry` is published to the handles (swapped with it, in the same message).
    published: SharedRegistry,
    engine: Arc<dyn Engine>,
    workers: BTreeMap<String, Worker>,
    waiting: BTreeMap<RequestId, Waiter>,
    loads: VecDeque<(String, u32)>,
    loading: Option<String>,
    evicted_for: BTreeMap<String, Vec<String>>,
    last_load: BTreeMap<String, (u64, u64)>,
    tx: mpsc::UnboundedSender<Msg>,
    events: broadcast::Sender<Stamped>,
    started: Instant,
    started_unix_ms: u64,
    pool_total: u64,
    headroom: u64,
    probe_source: String,
    desired: DesiredState,
    state_file: Option<std::path::PathBuf>,
    background: BTreeMap<RequestId, String>,
    next_internal_id: u64,
    /// Counters of workers that have exited, so totals survive unloads.
    retired: BTreeMap<String, Counters>,
    /// `[daemon] model_roots`, checked again at every load.
    model_roots: Vec<std::path::PathBuf>,
    /// Each model's last measured unload: (freed, what its load measured).
    unloads: BTreeMap<String, (u64, u64)>,
}

/// Starts the state owner and its probe and tick tasks; returns the handle.
pub fn start(
    config: &Config,
    registry: Arc<Registry>,
    engine: Arc<dyn Engine>,
    mut prober: Prober,
) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let (events, _) = broadcast::channel(4096);
    let reload_engine = engine.clone();
    let first = prober.sample();
    let pool_total = match &first {
        Ok(s) => s.total_bytes,
        Err(e) => {
            tracing::warn!(error = %e, "no memory sample; the ceiling must be absolute");
            0
        }
    };
    let d = &config.daemon;
    let ceiling = d.memory_ceiling.resolve(pool_total);
    let headroom = d.headroom.resolve(pool_total);
    let mut gconfig = GovernorConfig::new(ceiling, headroom);
    gconfig.max_resident = d.max_resident;
    gconfig.pressure_dwell_ms = d.pressure_dwell_ms;
    let specs = registry.models.values().filter_map(|m| m.spec());
    let mut governor = Governor::new(gconfig, specs);
    if let Ok(s) = first {
        governor.handle(Event::Snapshot(s), 0);
    }
    let router = config.router().unwrap_or_default();
    let desired = d
        .state_file
        .as_ref()
        .map(|p| {
            let (state, problems) = DesiredState::load_or_recover(p);
            for problem in problems {
                tracing::error!(problem, "state file");
            }
            state
        })
        .unwrap_or_default();
    let probe_source = match &d.probe {
        crate::probe::ProbeSource::File(_) => "file".to_string(),
        crate::probe::ProbeSource::Os => std::env::consts::OS.to_string(),
    };
    let published: SharedRegistry = Arc::new(std::sync::RwLock::new(registry.clone()));
    let sup = Supervisor {
        governor,
        router,
        registry: registry.clone(),
        published: published.clone(),
        engine,
        workers: BTreeMap::new(),
        waiting: BTreeMap::new(),
        loads: VecDeque::new(),
        loading: None,
        evicted_for: BTreeMap::new(),
        last_load: BTreeMap::new(),
        tx: tx.clone(),
        events: events.clone(),
        started: Instant::now(),
        started_unix_ms: unix_ms(),
        pool_total,
        headroom,
        probe_source,
        desired,
        state_file: d.state_file.clone(),
        background: BTreeMap::new(),
        next_internal_id: 1 << 62,
        retired: BTreeMap::new(),
        model_roots: d.model_roots.clone(),
        unloads: BTreeMap::new(),
    };
    tracing::info!(
        ceiling_bytes = ceiling,
        headroom_bytes = headroom,
        pool_bytes = pool_total,
        models = registry.models.len(),
        "memory governance ready"
    );
    let boot: Vec<(String, bool)> = config
        .models
        .iter()
        .filter(|m| {
            m.pinned
                || m.preload
                || sup.desired.pinned.contains(&m.name)
                || sup.desired.loaded.contains(&m.name)
        })
        .map(|m| {
            (
                m.name.clone(),
                m.pinned || sup.desired.pinned.contains(&m.name),
            )
        })
        .collect();
    tokio::spawn(sup.run(rx, boot));
    // The probe samples on a blocking thread (reading /proc or sysctls can stall under pressure), every
    // interval, and at once when the OS announces a pressure change (macOS); polling stays the fallback.
    let interval = Duration::from_millis(d.probe_interval_ms);
    let probe_tx = tx.clone();
    let (wake_tx, wake_rx) = std::sync::mpsc::channel();
    if crate::probe::macos::watch_pressure(wake_tx) {
        tracing::info!("the OS's memory-pressure events wake the probe");
    }
    std::thread::Builder::new()
        .name("ult-probe".into())
        .spawn(move || {
            crate::probe::sample_loop(&mut prober, interval, &wake_rx, |s| {
                probe_tx.send(Msg::Snapshot(s)).is_ok()
            });
        })
        .ok();
    let tick_tx = tx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            if tick_tx.send(Msg::Tick).is_err() {
                break;
            }
        }
    });
    Handle {
        tx,
        registry: published,
        reload: Arc::new(ReloadSource {
            file: config.file.clone(),
            engine: reload_engine,
            daemon: config.daemon.clone(),
            lock: tokio::sync::Mutex::new(()),
        }),
        events,
        next_id: Arc::new(AtomicU64::new(1)),
        load_wait: Duration::from_millis(d.load_wait_ms),
        limits: crate::limits::ClientLimits::new(d.max_requests_per_client),
        work: crate::requests::RequestWork::new(d.guard.request_threads, d.guard.request_memory),
        write_timeout: Duration::from_millis(d.guard.write_timeout_ms),
        draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        end_streams: Arc::new(tokio::sync::watch::channel(false).0),
        grace_ms: d.shutdown_grace_ms,
    }
}

/// True when an unload freed less than 90% of what its load measured, by more than 8 MiB (device
/// counters move with other work too).
pub fn unload_fell_short(freed: u64, measured_load: u64) -> bool {
    freed.saturating_add(8 << 20) < measured_load && freed < measured_load / 10 * 9
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Supervisor {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn emit(&self, event: WatchEvent) {
        let _ = self.events.send(Stamped {
            unix_ms: unix_ms(),
            event,
        });
    }

    fn internal_id(&mut self) -> RequestId {
        self.next_internal_id += 1;
        RequestId(self.next_internal_id)
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>, boot: Vec<(String, bool)>) {
        for (name, pin) in boot {
            let now = self.now();
            let id = self.internal_id();
            self.background.insert(id, name.clone());
            let plan = if pin {
                self.governor.pin(id, &name, now)
            } else {
                Ok(self.governor.handle(
                    Event::Request {
                        id,
                        model: name.clone(),
                        kind: RequestKind::Load,
                    },
                    now,
                ))
            };
            match plan {
                Ok(plan) => self.execute(plan),
                Err(e) => tracing::warn!(model = %name, error = %e, "boot load refused"),
            }
        }
        while let Some(msg) = rx.recv().await {
            if let Msg::Shutdown { reply } = msg {
                self.shutdown();
                let _ = reply.send(());
                break;
            }
            self.handle(msg);
        }
    }

    fn handle(&mut self, msg: Msg) {
        let now = self.now();
        match msg {
            Msg::Resolve { name, reply } => {
                let _ = reply.send(self.resolve(&name));
            }
            Msg::Acquire {
                id,
                model,
                kind,
                reply,
            } => {
                if reply.is_closed() {
                    return;
                }
                self.waiting.insert(
                    id,
                    Waiter {
                        model: model.clone(),
                        kind,
                        reply,
                    },
                );
                let plan = self
                    .governor
                    .handle(Event::Request { id, model, kind }, now);
                self.execute(plan);
            }
            Msg::Cancel { id } => {
                if self.waiting.remove(&id).is_some() {
                    let plan = self.governor.handle(Event::Cancel { id }, now);
                    self.execute(plan);
                }
            }
            Msg::Done { model, keep_alive } => {
                if let Some(keep_alive) = keep_alive {
                    let model = model.clone();
                    let plan = self
                        .governor
                        .handle(Event::KeepAliveAfter { model, keep_alive }, now);
                    self.execute(plan);
                }
                let plan = self.governor.handle(Event::RequestDone { model }, now);
                self.execute(plan);
            }
            Msg::Progress {
                model,
                loaded,
                total,
            } => {
                self.emit(WatchEvent::Progress {
                    model,
                    loaded_bytes: loaded,
                    total_bytes: total,
                });
            }
            Msg::LoadFinished {
                model,
                result,
                measured_bytes,
                load_ms,
            } => {
                self.loading = None;
                self.on_load_finished(model, result, measured_bytes, load_ms, now);
                self.start_next_load();
            }
            Msg::WorkerExited {
                model,
                crash,
                freed,
            } => {
                if let Some(freed) = freed {
                    self.measure_unload(&model, freed);
                }
                let event = match crash {
                    None => Event::UnloadFinished {
                        model: model.clone(),
                    },
                    Some(e) => {
                        tracing::error!(model = %model, error = %e, "worker crashed; model dropped");
                        if let Some(w) = self.workers.remove(&model) {
                            self.retire(&model, &w);
                        }
                        self.emit(WatchEvent::Evicted {
                            model: model.clone(),
                            reason: "crashed".into(),
                            freed_bytes: 0,
                        });
                        Event::Lost {
                            model: model.clone(),
                            reason: ult_engine::without_backtrace(&e.to_string()).to_string(),
                        }
                    }
                };
                let plan = self.governor.handle(event, now);
                self.execute(plan);
            }
            Msg::Snapshot(s) => {
                // The governor sheds from the sample: tell it first what each prefix cache holds.
                let reports: Vec<(String, u64)> = self
                    .workers
                    .iter()
                    .map(|(name, w)| {
                        let bytes = w.stats().cached_bytes.load(Ordering::Relaxed);
                        (name.clone(), bytes)
                    })
                    .collect();
                for (model, cached_bytes) in reports {
                    let plan = self.governor.handle(
                        Event::KvCache {
                            model,
                            cached_bytes,
                        },
                        now,
                    );
                    self.execute(plan);
                }
                let plan = self.governor.handle(Event::Snapshot(s), now);
                self.execute(plan);
            }
            Msg::Tick => {
                let plan = self.governor.handle(Event::Tick, now);
                self.execute(plan);
            }
            Msg::Status { reply } => {
                let _ = reply.send(Ok(self.status(now)));
            }
            Msg::Unload { name, reply } => {
                let result = self.resolve(&name).and_then(|m| {
                    let model = m.config.name.clone();
                    let was = self
                        .governor
                        .model(&model, now)
                        .map_or(0, |v| v.charged_bytes);
                    let plan = self.governor.unload(&model, now)?;
                    let unloaded = !plan.is_empty();
                    self.execute(plan);
                    if self.desired.loaded.remove(&model) {
                        self.save_desired();
                    }
                    Ok(Unloaded {
                        unloaded,
                        freed_bytes: if unloaded { was } else { 0 },
                    })
                });
                let _ = reply.send(result);
            }
            Msg::Pin {
                id,
                name,
                pin,
                reply,
            } => {
                let result = self.resolve(&name).and_then(|m| {
                    let model = m.config.name.clone();
                    let plan = if pin {
                        self.background.insert(id, model.clone());
                        self.desired.pinned.insert(model.clone());
                        self.governor.pin(id, &model, now)?
                    } else {
                        self.desired.pinned.remove(&model);
                        self.governor.unpin(&model, now)?
                    };
                    self.save_desired();
                    self.execute(plan);
                    Ok(model)
                });
                let _ = reply.send(result);
            }
            Msg::Lease {
                id,
                name,
                ttl_ms,
                reply,
            } => {
                let result = self.resolve(&name).and_then(|m| {
                    let model = m.config.name.clone();
                    self.background.insert(id, model.clone());
                    let (lease, until, plan) = self.governor.lease(id, &model, ttl_ms, now)?;
                    self.execute(plan);
                    Ok((model, lease, self.started_unix_ms.saturating_add(until)))
                });
                let _ = reply.send(result);
            }
            Msg::Release { lease, reply } => {
                let result = self
                    .governor
                    .release(lease, now)
                    .map_err(ServiceError::from)
                    .map(|plan| {
                        self.execute(plan);
                        true
                    });
                let _ = reply.send(result);
            }
            Msg::PlanLoad { name, reply } => {
                let result = self.resolve(&name).and_then(|m| {
                    self.governor
                        .preview_load(&m.config.name, now)
                        .map_err(ServiceError::from)
                });
                let _ = reply.send(result);
            }
            Msg::Reload {
                registry,
                reuse,
                router,
                model_roots,
                reply,
            } => {
                let _ = reply.send(Ok(self.reconfigure(
                    registry,
                    &reuse,
                    router,
                    model_roots,
                    now,
                )));
            }
            Msg::Shutdown { .. } => {}
        }
    }

    /// Swaps in a reloaded registry and router and lets the governor reconfigure (unloads happen once
    /// the models they concern are idle).
    fn reconfigure(
        &mut self,
        registry: Arc<Registry>,
        reuse: &BTreeMap<String, crate::registry::Reuse>,
        router: Router,
        model_roots: Vec<std::path::PathBuf>,
        now: u64,
    ) -> ReloadSummary {
        use crate::registry::Reuse;
        let mut summary = ReloadSummary {
            removed: self
                .registry
                .models
                .keys()
                .filter(|n| !registry.models.contains_key(*n))
                .cloned()
                .collect(),
            ..ReloadSummary::default()
        };
        let mut changes = Vec::new();
        for (name, m) in &registry.models {
            let how = reuse.get(name).copied().unwrap_or(Reuse::Reload);
            match how {
                Reuse::Added => summary.added.push(name.clone()),
                Reuse::Unchanged => summary.unchanged += 1,
                Reuse::Settings => summary.updated.push(name.clone()),
                Reuse::Reload => summary.reloaded.push(name.clone()),
            }
            if let Some(spec) = m.spec() {
                changes.push(match how {
                    Reuse::Reload => ult_policy::ModelChange::Reload(spec),
                    _ => ult_policy::ModelChange::Keep(spec),
                });
            }
        }
        tracing::info!(
            added = ?summary.added,
            removed = ?summary.removed,
            reloaded = ?summary.reloaded,
            updated = ?summary.updated,
            unchanged = summary.unchanged,
            "configuration reloaded"
        );
        *self
            .published
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = registry.clone();
        self.registry = registry;
        self.router = router;
        self.model_roots = model_roots;
        let mut forgot = false;
        for name in &summary.removed {
            forgot |= self.desired.pinned.remove(name) | self.desired.loaded.remove(name);
        }
        if forgot {
            self.save_desired();
        }
        let plan = self.governor.reconfigure(changes, now);
        self.execute(plan);
        // What must be resident is loaded again (a reloaded model with a pin or a lease, as soon as its
        // unload is done) or for the first time (an added model that is pinned or preloaded), as at boot.
        let wanted: Vec<String> = summary
            .reloaded
            .iter()
            .filter(|n| {
                self.governor
                    .model(n, now)
                    .is_some_and(|v| v.pinned || v.leases > 0)
            })
            .chain(summary.added.iter().filter(|n| {
                self.registry
                    .get(n)
                    .is_some_and(|m| m.config.pinned || m.config.preload)
            }))
            .cloned()
            .collect();
        for name in wanted {
            let id = self.internal_id();
            self.background.insert(id, name.clone());
            let plan = self.governor.handle(
                Event::Request {
                    id,
                    model: name,
                    kind: RequestKind::Load,
                },
                now,
            );
            self.execute(plan);
        }
        summary
    }

    fn resolve(&self, name: &str) -> Result<Arc<RegisteredModel>, ServiceError> {
        let model = self
            .router
            .resolve(name, &self.governor, self.now())
            .or_else(|e| {
                // Models that could not be inspected are not in the governor; the router still knows them.
                if self.registry.get(name).is_some() {
                    Ok(name.to_string())
                } else {
                    Err(e)
                }
            })?;
        let m = self.registry.get(&model).ok_or_else(|| {
            ServiceError::Rejected(Rejection::UnknownModel {
                name: name.to_string(),
                known: self.router.known_names(),
            })
        })?;
        if let Err(reason) = &m.inspection {
            return Err(ServiceError::Unavailable {
                model: model.clone(),
                reason: reason.clone(),
            });
        }
        Ok(m.clone())
    }

    fn execute(&mut self, plan: Plan) {
        for action in plan.actions {
            match action {
                Action::Load { model, kv_tokens } => {
                    let predicted = self
                        .registry
                        .get(&model)
                        .and_then(|m| m.inspection.as_ref().ok())
                        .map_or(0, |i| i.footprint.total());
                    self.emit(WatchEvent::Loading {
                        model: model.clone(),
                        predicted_bytes: predicted,
                    });
                    self.loads.push_back((model, kv_tokens));
                    self.start_next_load();
                }
                Action::Unload {
                    model,
                    reason,
                    bytes,
                } => {
                    tracing::info!(model = %model, reason = reason.as_str(), bytes, "unloading");
                    self.emit(WatchEvent::Evicted {
                        model: model.clone(),
                        reason: reason.as_str().into(),
                        freed_bytes: bytes,
                    });
                    self.note_eviction(&model, reason);
                    match self.workers.remove(&model) {
                        Some(worker) => {
                            self.retire(&model, &worker);
                            worker.stop();
                        }
                        None => {
                            let plan = self
                                .governor
                                .handle(Event::UnloadFinished { model }, self.now());
                            self.execute(plan);
                        }
                    }
                }
                Action::DropCache { model, bytes } => {
                    if let Some(w) = self.workers.get(&model) {
                        let _ = w.submit(crate::worker::Job::DropCache);
                    }
                    tracing::info!(model = %model, bytes, "dropping the prefix cache");
                    self.emit(WatchEvent::CacheDropped { model, bytes });
                }
                Action::DropIdleKv { model } => {
                    if let Some(w) = self.workers.get(&model) {
                        let _ = w.submit(crate::worker::Job::ReleaseKv);
                    }
                }
                Action::SetKvBudget { model, tokens } => {
                    if let Some(w) = self.workers.get(&model) {
                        let _ = w.submit(crate::worker::Job::SetBudget(tokens as usize));
                    }
                    self.emit(WatchEvent::KvBudget { model, tokens });
                }
                Action::Admit {
                    id,
                    model,
                    caused_load,
                } => self.grant(id, &model, caused_load),
                Action::Reject { id, reason } => {
                    if let Some(w) = self.waiting.remove(&id) {
                        let _ = w.reply.send(Err(ServiceError::Rejected(reason)));
                    } else if let Some(model) = self.background.remove(&id) {
                        tracing::warn!(model = %model, reason = %reason, "background load refused");
                    }
                }
                Action::PressureChanged { level, reason } => {
                    tracing::warn!(level = %level, reason = %reason, "memory pressure changed");
                    self.emit(WatchEvent::Pressure { level, reason });
                }
            }
        }
    }

    /// Remembers which models were evicted to make room, so the load they made room for can report them.
    fn note_eviction(&mut self, model: &str, reason: EvictReason) {
        if !matches!(reason, EvictReason::MakeRoom | EvictReason::MaxResident) {
            return;
        }
        // The load waiting for this room is the first waiting (not yet loading) model of a waiting request.
        let target = self.waiting.values().map(|w| w.model.clone()).find(|m| {
            matches!(
                self.governor.residency(m),
                Some(Residency::Unloaded | Residency::Failed)
            )
        });
        if let Some(t) = target {
            self.evicted_for
                .entry(t)
                .or_default()
                .push(model.to_string());
        }
    }

    fn grant(&mut self, id: RequestId, model: &str, caused_load: bool) {
        if self.background.remove(&id).is_some() {
            return;
        }
        let Some(waiter) = self.waiting.remove(&id) else {
            // The request went away between the plan and now: give the slot back.
            return;
        };
        let Some(registered) = self.registry.get(model).cloned() else {
            return;
        };
        // An explicit load is part of the desired state, restored at boot.
        if waiter.kind == RequestKind::Load && self.desired.loaded.insert(model.to_string()) {
            self.save_desired();
        }
        let jobs = self.workers.get(model).and_then(Worker::sender);
        let done = (waiter.kind == RequestKind::Use).then(|| DoneGuard {
            tx: self.tx.clone(),
            model: model.to_string(),
            keep_alive: None,
        });
        let (load_ms, measured) = self
            .last_load
            .get(model)
            .map_or((None, None), |&(ms, bytes)| (Some(ms), Some(bytes)));
        let grant = Grant {
            model: registered,
            jobs,
            load_ms: if caused_load { load_ms } else { None },
            evicted: if caused_load {
                self.evicted_for.get(model).cloned().unwrap_or_default()
            } else {
                Vec::new()
            },
            measured_bytes: measured,
            _done: done,
        };
        // A failed send drops the grant, whose guard reports the request done.
        let _ = waiter.reply.send(Ok(grant));
    }

    fn start_next_load(&mut self) {
        if self.loading.is_some() {
            return;
        }
        let Some((model, kv_tokens)) = self.loads.pop_front() else {
            return;
        };
        let Some(registered) = self.registry.get(&model).cloned() else {
            return;
        };
        let Ok(inspection) = registered.inspection.clone() else {
            return;
        };
        self.loading = Some(model.clone());
        let tx = self.tx.clone();
        let engine = self.engine.clone();
        let total = inspection.load_bytes;
        let roots = self.model_roots.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ult-load-{model}"))
            .spawn(move || {
                let started = Instant::now();
                let device_before = engine.device_memory();
                let rss_before = crate::probe::process_rss();
                let loaded = AtomicU64::new(0);
                let reported = AtomicU64::new(0);
                let progress = |bytes: u64| {
                    let now = loaded.fetch_add(bytes, Ordering::Relaxed) + bytes;
                    // Report every 2% (and the end).
                    if now >= reported.load(Ordering::Relaxed) + total / 50 || now >= total {
                        reported.store(now, Ordering::Relaxed);
                        let _ = tx.send(Msg::Progress {
                            model: model.clone(),
                            loaded: now,
                            total,
                        });
                    }
                };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    // The roots again: a link repointed since boot must not lead out of them.
                    let mut source = registered.source.clone();
                    if !roots.is_empty() {
                        source.path = crate::config::within_roots(&source.path, &roots).map_err(
                            |reason| EngineError::InvalidParameter {
                                field: "path",
                                reason,
                            },
                        )?;
                    }
                    engine.load(&source, &inspection, kv_tokens as usize, &progress)
                }))
                .unwrap_or_else(|p| Err(EngineError::from_panic("loading", p)));
                let measured = match (device_before, engine.device_memory()) {
                    (Some((free_before, _)), Some((free_after, _))) => {
                        free_before.saturating_sub(free_after)
                    }
                    _ if crate::alloc::installed() => {
                        crate::alloc::thread_net_bytes().max(0) as u64
                    }
                    _ => crate::probe::process_rss()
                        .zip(rss_before)
                        .map_or(0, |(a, b)| a.saturating_sub(b)),
                };
                let _ = tx.send(Msg::LoadFinished {
                    model,
                    result: result.map(LoadedModelBox),
                    measured_bytes: measured,
                    load_ms: started.elapsed().as_millis() as u64,
                });
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a load thread");
            self.loading = None;
        }
    }

    fn on_load_finished(
        &mut self,
        model: String,
        result: Result<LoadedModelBox, EngineError>,
        measured: u64,
        load_ms: u64,
        now: u64,
    ) {
        let Some(registered) = self.registry.get(&model).cloned() else {
            return;
        };
        let event = match result {
            Ok(LoadedModelBox(loaded)) => {
                let tokenizer = match &registered.inspection {
                    Ok(i) => i.tokenizer.clone(),
                    Err(_) => return,
                };
                let kv_tokens = loaded.kv_tokens() as u32;
                let tx = self.tx.clone();
                let name = model.clone();
                let prefix_cache = registered.config.prefix_cache;
                let (before, after) = (self.engine.clone(), self.engine.clone());
                match Worker::spawn(
                    &model,
                    loaded,
                    tokenizer,
                    prefix_cache,
                    // The device's free bytes just before and just after the model is dropped (GPU only).
                    move || before.device_memory().map(|(free, _)| free),
                    move |crash, free_before| {
                        let freed = free_before
                            .zip(after.device_memory().map(|(free, _)| free))
                            .map(|(b, a)| a.saturating_sub(b));
                        let _ = tx.send(Msg::WorkerExited {
                            model: name,
                            crash,
                            freed,
                        });
                    },
                ) {
                    Ok(worker) => {
                        self.workers.insert(model.clone(), worker);
                        self.last_load.insert(model.clone(), (load_ms, measured));
                        let predicted = registered.inspection.as_ref().map_or(0, |i| {
                            i.footprint.steady_bytes() + i.footprint.kv_bytes(kv_tokens)
                        });
                        tracing::info!(model = %model, load_ms, measured_bytes = measured, predicted_bytes = predicted, "loaded");
                        self.emit(WatchEvent::Loaded {
                            model: model.clone(),
                            load_ms,
                            measured_bytes: measured,
                            predicted_bytes: predicted,
                        });
                        Event::LoadFinished {
                            model: model.clone(),
                            measured_bytes: measured,
                            kv_tokens,
                            load_ms,
                        }
                    }
                    Err(e) => Event::LoadFailed {
                        model: model.clone(),
                        reason: format!("cannot start its worker: {e}"),
                    },
                }
            }
            Err(e) => {
                // The log gets the whole error (a backtrace, if one was captured); clients the message.
                tracing::error!(model = %model, error = ?e, "load failed");
                let reason = ult_engine::without_backtrace(&e.to_string()).to_string();
                self.emit(WatchEvent::LoadFailed {
                    model: model.clone(),
                    reason: reason.clone(),
                });
                Event::LoadFailed {
                    model: model.clone(),
                    reason,
                }
            }
        };
        let plan = self.governor.handle(event, now);
        self.execute(plan);
        self.evicted_for.remove(&model);
    }

    fn retire(&mut self, model: &str, worker: &Worker) {
        let c = Counters::read(worker.stats());
        let total = self.retired.get(model).copied().unwrap_or_default().add(c);
        self.retired.insert(model.to_string(), total);
    }

    fn counters(&self, model: &str) -> Counters {
        let live = self
            .workers
            .get(model)
            .map(|w| Counters::read(w.stats()))
            .unwrap_or_default();
        self.retired
            .get(model)
            .copied()
            .unwrap_or_default()
            .add(live)
    }

    fn save_desired(&self) {
        if let Some(path) = &self.state_file
            && let Err(e) = self.desired.save(path)
        {
            tracing::error!(error = %e, "cannot save the desired state");
        }
    }

    /// Compares what an unload freed on the device with what the model's load measured. Candle's Metal
    /// pool, for one, can keep freed buffers (huggingface/candle#3464; the device is settled before it is
    /// read, which drops them); whatever stays is shown in Status rather than assumed gone.
    fn measure_unload(&mut self, model: &str, freed: u64) {
        let expected = self
            .last_load
            .get(model)
            .map_or(0, |&(_, measured)| measured);
        self.unloads.insert(model.to_string(), (freed, expected));
        if unload_fell_short(freed, expected) {
            tracing::warn!(
                model,
                freed_bytes = freed,
                measured_load_bytes = expected,
                "the unload freed less on the device than the load took"
            );
        }
    }

    fn status(&self, now: u64) -> StatusView {
        let verdict = self.governor.verdict();
        let snapshot = self.governor.snapshot().copied();
        let models = self
            .registry
            .models
            .values()
            .map(|m| {
                let view = self.governor.model(&m.config.name, now);
                let last_used_unix_ms = view
                    .as_ref()
                    .and_then(|v| v.last_used_ms)
                    .map(|t| self.started_unix_ms + t);
                ModelStatus {
                    model: m.clone(),
                    view,
                    last_used_unix_ms,
                    counters: self.counters(&m.config.name),
                    batch: self
                        .workers
                        .get(&m.config.name)
                        .map(|w| BatchView::read(w.stats())),
                    last_unload: self.unloads.get(&m.config.name).copied(),
                }
            })
            .collect();
        StatusView {
            device: self.engine.device_name(),
            pool_total_bytes: self.pool_total,
            ceiling_bytes: self.governor.config().ceiling_bytes,
            headroom_bytes: self.headroom,
            used_bytes: self.governor.used_bytes(),
            free_bytes: self.governor.free_bytes(),
            available_bytes: snapshot.map_or(0, |s| s.available_bytes),
            pressure: verdict.level,
            pressure_reason: verdict.reason.clone(),
            uptime_ms: now,
            loads_in_flight: (self.loads.len() + usize::from(self.loading.is_some())) as u32,
            snapshot,
            probe_source: self.probe_source.clone(),
            max_resident: self.governor.config().max_resident.unwrap_or(0),
            models,
            routes: self.router.routes().cloned().collect(),
        }
    }

    fn shutdown(&mut self) {
        for (_, w) in std::mem::take(&mut self.workers) {
            w.join();
        }
        for (_, w) in std::mem::take(&mut self.waiting) {
            let _ = w.reply.send(Err(ServiceError::ShuttingDown));
        }
    }
}

/// Whether a registered model can serve a request of `wanted` kind.
pub fn check_kind(m: &RegisteredModel, wanted: ModelKind) -> Result<(), ServiceError> {
    let actual = m.inspection.as_ref().map_or(m.config.kind, |i| i.kind);
    let ok = match wanted {
        ModelKind::Embedding => actual == ModelKind::Embedding,
        ModelKind::Chat => actual == ModelKind::Chat,
        ModelKind::Completion => matches!(actual, ModelKind::Chat | ModelKind::Completion),
    };
    if ok {
        return Ok(());
    }
    match (wanted, actual) {
        (ModelKind::Chat, ModelKind::Completion) if m.config.kind == ModelKind::Chat => {
            Err(ServiceError::NoChatTemplate {
                model: m.config.name.clone(),
            })
        }
        (ModelKind::Chat, ModelKind::Completion) => Err(ServiceError::NoChatTemplate {
            model: m.config.name.clone(),
        }),
        _ => Err(ServiceError::wrong_kind(
            &m.config.name,
            actual,
            match wanted {
                ModelKind::Embedding => "embedding",
                ModelKind::Chat => "chat",
                ModelKind::Completion => "text-generation",
            },
        )),
    }
}

#[cfg(test)]
mod unload_tests {
    use super::unload_fell_short;

    #[test]
    fn an_unload_that_keeps_buffers_is_flagged() {
        const MIB: u64 = 1 << 20;
        assert!(!unload_fell_short(1000 * MIB, 1000 * MIB));
        assert!(!unload_fell_short(950 * MIB, 1000 * MIB), "within 10%");
        assert!(
            unload_fell_short(600 * MIB, 1000 * MIB),
            "a pool kept 400 MiB"
        );
        assert!(
            !unload_fell_short(0, 5 * MIB),
            "too small to tell from noise"
        );
    }
}
