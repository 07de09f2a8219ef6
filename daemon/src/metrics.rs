//! Prometheus metrics, with the prometheus-client crate: request outcomes, tokens and time to first token
//! recorded by the request paths; loads and evictions followed from the state owner's watch events; memory
//! and per-model gauges refreshed from `Status` at every scrape.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use ult_policy::{PressureLevel, Residency};

use crate::error::ServiceError;
use crate::supervisor::{Handle, StatusView, WatchEvent};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    model: String,
    kind: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    model: String,
    direction: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    model: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    model: String,
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontLabels {
    front: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn load_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 12))
}

/// Every metric ult exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    tokens: Family<DirectionLabels, Counter>,
    ttft: HistogramFamily<ModelLabel>,
    load_seconds: HistogramFamily<ModelLabel>,
    evictions: Family<ReasonLabels, Counter>,
    state: Family<StateLabels, Gauge>,
    predicted: Family<ModelLabel, Gauge>,
    measured: Family<ModelLabel, Gauge>,
    charged: Family<ModelLabel, Gauge>,
    kv_budget: Family<ModelLabel, Gauge>,
    in_flight: Family<ModelLabel, Gauge>,
    sequences: Family<StateLabels, Gauge>,
    kv_blocks: Family<StateLabels, Gauge>,
    kv_pool: Family<ModelLabel, Gauge>,
    preemptions: Family<ModelLabel, Gauge>,
    cache_lookups: Family<StateLabels, Gauge>,
    cache_tokens: Family<ModelLabel, Gauge>,
    cache_bytes: Family<ModelLabel, Gauge>,
    unauthenticated: Family<FrontLabels, Counter>,
    ceiling: Gauge,
    used: Gauge,
    available: Gauge,
    pool: Gauge,
    pressure: Gauge,
    loads_in_flight: Gauge,
    request_memory: Gauge,
    request_memory_budget: Gauge,
    process: Gauge,
    swap_out: Gauge<f64, AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// How a request ended, as a metric label.
pub fn outcome_of(result: &Result<(), &ServiceError>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(e) => match e.code() {
            tonic::Code::NotFound => "not_found",
            tonic::Code::InvalidArgument => "invalid",
            tonic::Code::ResourceExhausted => "exhausted",
            tonic::Code::Unavailable => "unavailable",
            tonic::Code::FailedPrecondition => "wrong_model",
            tonic::Code::Cancelled => "cancelled",
            _ => "error",
        },
    }
}

impl Metrics {
    /// A registry with every family registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ult");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by model, kind (generate, embed) and outcome",
            requests.clone(),
        );
        let tokens = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens in (prompt) and out (generated)",
            tokens.clone(),
        );
        let ttft: HistogramFamily<ModelLabel> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "time_to_first_token_seconds",
            "From request to first generated token",
            ttft.clone(),
        );
        let load_seconds: HistogramFamily<ModelLabel> =
            Family::new_with_constructor(load_histogram);
        registry.register(
            "load_duration_seconds",
            "Model load time, weights to warm",
            load_seconds.clone(),
        );
        let evictions = Family::<ReasonLabels, Counter>::default();
        registry.register("evictions", "Models unloaded, by reason", evictions.clone());
        let state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "model_state",
            "1 for each model's current state",
            state.clone(),
        );
        let predicted = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "model_predicted_bytes",
            "Predicted footprint at the full context",
            predicted.clone(),
        );
        let measured = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "model_measured_bytes",
            "Measured bytes after the last load",
            measured.clone(),
        );
        let charged = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "model_charged_bytes",
            "Bytes the ledger charges now",
            charged.clone(),
        );
        let kv_budget = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "model_kv_budget_tokens",
            "KV budget per sequence",
            kv_budget.clone(),
        );
        let in_flight = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "model_requests_in_flight",
            "Requests running",
            in_flight.clone(),
        );
        let sequences = Family::<StateLabels, Gauge>::default();
        registry.register(
            "model_sequences",
            "Sequences of a resident decoder by state (running in the batch, waiting for admission, paused for a client that stopped reading)",
            sequences.clone(),
        );
        let kv_blocks = Family::<StateLabels, Gauge>::default();
        registry.register(
            "model_kv_blocks",
            "KV blocks of a resident decoder's pool by state (used, free)",
            kv_blocks.clone(),
        );
        let kv_pool = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "model_kv_pool_bytes",
            "Bytes the KV block pool holds now",
            kv_pool.clone(),
        );
        let preemptions = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "model_preemptions",
            "Sequences preempted (KV freed, recomputed later) since the daemon started",
            preemptions.clone(),
        );
        let cache_lookups = Family::<StateLabels, Gauge>::default();
        registry.register(
            "model_prefix_cache_lookups",
            "Admissions that reused prefix-cache blocks (state=hit) or found none (state=miss), over every load",
            cache_lookups.clone(),
        );
        let cache_tokens = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "model_prefix_cached_tokens",
            "Prompt tokens served from the prefix cache instead of computed, over every load",
            cache_tokens.clone(),
        );
        let cache_bytes = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "model_kv_cached_bytes",
            "Bytes of the KV pool the prefix cache holds in blocks no sequence references",
            cache_bytes.clone(),
        );
        let unauthenticated = Family::<FrontLabels, Counter>::default();
        registry.register(
            "unauthenticated_requests",
            "Requests refused for a missing or wrong token",
            unauthenticated.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let ceiling = gauge(&mut registry, "memory_ceiling_bytes", "The memory ceiling");
        let used = gauge(
            &mut registry,
            "memory_used_bytes",
            "Bytes the ledger charges to models",
        );
        let available = gauge(
            &mut registry,
            "memory_available_bytes",
            "What the OS reports available",
        );
        let pool = gauge(
            &mut registry,
            "memory_pool_bytes",
            "Size of the governed pool",
        );
        let pressure = gauge(
            &mut registry,
            "memory_pressure_level",
            "0 normal, 1 warning, 2 critical",
        );
        let loads_in_flight = gauge(&mut registry, "loads_in_flight", "Loads running or queued");
        let request_memory = gauge(
            &mut registry,
            "request_memory_bytes",
            "Transient memory held by requests being templated and tokenized",
        );
        let request_memory_budget = gauge(
            &mut registry,
            "request_memory_budget_bytes",
            "The request memory budget ([daemon] request_memory)",
        );
        let process = gauge(
            &mut registry,
            "process_pool_bytes",
            "Bytes of the pool this process holds",
        );
        let swap_out = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "memory_swap_out_bytes_per_second",
            "Swap-out rate",
            swap_out.clone(),
        );
        Self {
            registry,
            requests,
            tokens,
            ttft,
            load_seconds,
            evictions,
            state,
            predicted,
            measured,
            charged,
            kv_budget,
            in_flight,
            sequences,
            kv_blocks,
            kv_pool,
            preemptions,
            cache_lookups,
            cache_tokens,
            cache_bytes,
            unauthenticated,
            ceiling,
            used,
            available,
            pool,
            pressure,
            loads_in_flight,
            request_memory,
            request_memory_budget,
            process,
            swap_out,
        }
    }

    /// Counts one request of `kind` ("generate", "embed") on `model` with its outcome.
    pub fn request(&self, model: &str, kind: &str, outcome: &str) {
        self.requests
            .get_or_create(&OutcomeLabels {
                model: model.into(),
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Counts tokens in and out and the time to first token of a finished generation.
    pub fn generated(&self, model: &str, prompt_tokens: u64, completion_tokens: u64, ttft_ms: f64) {
        self.tokens
            .get_or_create(&DirectionLabels {
                model: model.into(),
                direction: "in".into(),
            })
            .inc_by(prompt_tokens);
        self.tokens
            .get_or_create(&DirectionLabels {
                model: model.into(),
                direction: "out".into(),
            })
            .inc_by(completion_tokens);
        if completion_tokens > 0 {
            self.ttft
                .get_or_create(&ModelLabel {
                    model: model.into(),
                })
                .observe(ttft_ms / 1000.0);
        }
    }

    /// Counts prompt tokens of an embedding request.
    pub fn embedded(&self, model: &str, prompt_tokens: u64) {
        self.tokens
            .get_or_create(&DirectionLabels {
                model: model.into(),
                direction: "in".into(),
            })
            .inc_by(prompt_tokens);
    }

    /// Counts a request refused for authentication at `front` ("grpc", "http").
    pub fn unauthenticated(&self, front: &str) {
        self.unauthenticated
            .get_or_create(&FrontLabels {
                front: front.into(),
            })
            .inc();
    }

    /// Follows the state owner's events for loads and evictions, until the daemon stops.
    pub fn follow(self: &Arc<Self>, handle: &Handle) {
        let mut events = handle.subscribe();
        let metrics = self.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) => match e.event {
                        WatchEvent::Loaded { model, load_ms, .. } => {
                            metrics
                                .load_seconds
                                .get_or_create(&ModelLabel { model })
                                .observe(load_ms as f64 / 1000.0);
                        }
                        WatchEvent::Evicted { model, reason, .. } => {
                            metrics
                                .evictions
                                .get_or_create(&ReasonLabels { model, reason })
                                .inc();
                        }
                        _ => {}
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
        });
    }

    /// The text exposition, with gauges refreshed from `status` and the request budget `work`.
    pub fn render(&self, status: &StatusView, work: &crate::requests::RequestWork) -> String {
        let clamp_u = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.request_memory.set(clamp_u(work.in_flight_bytes()));
        self.request_memory_budget.set(clamp_u(work.budget()));
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.ceiling.set(clamp(status.ceiling_bytes));
        self.used.set(clamp(status.used_bytes));
        self.available.set(clamp(status.available_bytes));
        self.pool.set(clamp(status.pool_total_bytes));
        self.pressure.set(match status.pressure {
            PressureLevel::Normal => 0,
            PressureLevel::Warning => 1,
            PressureLevel::Critical => 2,
        });
        self.loads_in_flight.set(i64::from(status.loads_in_flight));
        self.process
            .set(clamp(status.snapshot.map_or(0, |s| s.process_bytes)));
        self.swap_out
            .set(status.snapshot.map_or(0.0, |s| s.swap_out_bytes_per_s));
        for m in &status.models {
            let name = m.model.config.name.clone();
            let label = ModelLabel {
                model: name.clone(),
            };
            let current = match (&m.model.inspection, m.view.as_ref().map(|v| v.residency)) {
                (Err(_), _) | (_, Some(Residency::Failed)) => "failed",
                (_, Some(Residency::Loading)) => "loading",
                (_, Some(Residency::Resident)) => "resident",
                (_, Some(Residency::Unloading)) => "unloading",
                _ => "unloaded",
            };
            for state in ["unloaded", "loading", "resident", "unloading", "failed"] {
                let v = i64::from(state == current);
                self.state
                    .get_or_create(&StateLabels {
                        model: name.clone(),
                        state: state.into(),
                    })
                    .set(v);
            }
            let f = m
                .model
                .inspection
                .as_ref()
                .map(|i| i.footprint)
                .unwrap_or_default();
            self.predicted.get_or_create(&label).set(clamp(f.total()));
            if let Some(v) = &m.view {
                self.measured
                    .get_or_create(&label)
                    .set(clamp(v.measured_bytes.unwrap_or(0)));
                self.charged
                    .get_or_create(&label)
                    .set(clamp(v.charged_bytes));
                self.kv_budget
                    .get_or_create(&label)
                    .set(i64::from(v.kv_tokens));
                self.in_flight
                    .get_or_create(&label)
                    .set(i64::from(v.in_flight));
            }
            let b = m.batch.unwrap_or_default();
            let labelled = |state: &str| StateLabels {
                model: name.clone(),
                state: state.into(),
            };
            self.sequences
                .get_or_create(&labelled("running"))
                .set(clamp(b.running));
            self.sequences
                .get_or_create(&labelled("waiting"))
                .set(clamp(b.waiting));
            self.sequences
                .get_or_create(&labelled("paused"))
                .set(clamp(b.paused));
            self.kv_blocks
                .get_or_create(&labelled("used"))
                .set(clamp(b.kv_blocks_used));
            self.kv_blocks
                .get_or_create(&labelled("cached"))
                .set(clamp(b.kv_cached_blocks));
            self.kv_blocks.get_or_create(&labelled("free")).set(clamp(
                b.kv_blocks_total
                    .saturating_sub(b.kv_blocks_used)
                    .saturating_sub(b.kv_cached_blocks),
            ));
            self.cache_bytes
                .get_or_create(&label)
                .set(clamp(b.kv_cached_bytes));
            self.cache_lookups
                .get_or_create(&labelled("hit"))
                .set(clamp(m.counters.cache_hits));
            self.cache_lookups
                .get_or_create(&labelled("miss"))
                .set(clamp(m.counters.cache_misses));
            self.cache_tokens
                .get_or_create(&label)
                .set(clamp(m.counters.cache_tokens_saved));
            self.kv_pool
                .get_or_create(&label)
                .set(clamp(b.kv_pool_bytes));
            self.preemptions
                .get_or_create(&label)
                .set(clamp(m.counters.preemptions));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        // The model-server metrics that the Gateway API Inference Extension's endpoint picker (llm-d)
        // scrapes, under vLLM's names, before the exposition's end.
        let body = out.strip_suffix("# EOF\n").unwrap_or(&out).to_string();
        body + &vllm_metrics(status) + "# EOF\n"
    }
}

/// `vllm:num_requests_running` (requests in model execution batches), `vllm:num_requests_waiting`
/// (requests waiting to be processed: for a load, for memory or for a batch slot) and
/// `vllm:kv_cache_usage_perc` (KV-cache usage, 1 meaning 100%), per model (`model_name`), with the
/// meanings vLLM documents, so such a gateway routes to ult pods unchanged.
pub fn vllm_metrics(status: &StatusView) -> String {
    let mut running = String::new();
    let mut waiting = String::new();
    let mut kv = String::new();
    for m in &status.models {
        let name = m
            .model
            .config
            .name
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        let b = m.batch.unwrap_or_default();
        let queued = m.view.as_ref().map_or(0, |v| u64::from(v.queued));
        running.push_str(&format!(
            "vllm:num_requests_running{{model_name=\"{name}\"}} {}\n",
            b.running + b.paused
        ));
        waiting.push_str(&format!(
            "vllm:num_requests_waiting{{model_name=\"{name}\"}} {}\n",
            b.waiting + queued
        ));
        let usage = if b.kv_blocks_total > 0 {
            b.kv_blocks_used as f64 / b.kv_blocks_total as f64
        } else {
            0.0
        };
        kv.push_str(&format!(
            "vllm:kv_cache_usage_perc{{model_name=\"{name}\"}} {usage}\n"
        ));
    }
    format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n{running}\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n{waiting}\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n{kv}"
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
