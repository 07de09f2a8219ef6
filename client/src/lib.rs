//! ult-client: a typed async client for ultd's gRPC API (`ult.v1.Ult`) over TCP or a Unix socket.
//! Results come back as this crate's own types; the generated proto types stay inside.
#![deny(missing_docs)]

pub mod service;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use ult_proto::v1 as pb;
use ult_proto::v1::ult_client::UltClient;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not a `host:port`, `http://…` or `unix:///path` address.
    #[error("invalid address {0:?}: expected host:port, http://host:port or unix:///path")]
    InvalidAddress(String),
    /// ultd could not be reached.
    #[error("cannot connect to ultd at {addr}: {reason} (is ultd running there?)")]
    Connect {
        /// The address.
        addr: String,
        /// The innermost cause ("Connection refused (os error 111)"): the transport's own layers repeat
        /// "transport error" around it.
        reason: String,
    },
    /// ultd answered with an error.
    #[error("{}: {message}", code_name(*.code))]
    Rpc {
        /// The gRPC code.
        code: tonic::Code,
        /// ultd's message.
        message: String,
    },
    /// A stream ended without its final message.
    #[error("the stream from ultd ended early")]
    Truncated,
    /// The token cannot be sent as an HTTP header.
    #[error("the token has characters a header cannot carry")]
    InvalidToken,
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        NotFound => "not found",
        InvalidArgument => "invalid argument",
        ResourceExhausted => "resource exhausted",
        FailedPrecondition => "failed precondition",
        Unavailable => "unavailable",
        Unauthenticated => "unauthenticated",
        DeadlineExceeded => "deadline exceeded",
        Internal => "internal error",
        _ => "error",
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        Self::Rpc {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

impl ClientError {
    fn connect(addr: &str, e: &tonic::transport::Error) -> Self {
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        Self::Connect {
            addr: addr.to_string(),
            reason: cause.to_string(),
        }
    }

    /// The gRPC code, when ultd answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A model's residency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// Not in memory.
    Unloaded,
    /// Being loaded.
    Loading,
    /// In memory.
    Resident,
    /// Being unloaded.
    Unloading,
    /// Failed (see `failure`).
    Failed,
}

/// A model's ledger entry and state.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The name.
    pub name: String,
    /// chat, completion or embedding.
    pub kind: String,
    /// Residency.
    pub state: ModelState,
    /// Why it failed, when it did.
    pub failure: Option<String>,
    /// Its file (or folder).
    pub path: String,
    /// Where it came from: `models.toml`, or the store a `model_dirs` scan found it in.
    pub origin: String,
    /// Architecture.
    pub architecture: String,
    /// Aliases.
    pub aliases: Vec<String>,
    /// Context window in tokens.
    pub context_tokens: u32,
    /// Predicted bytes at the full context, prefill scratch included.
    pub predicted_bytes: u64,
    /// The prediction comparable with `measured_bytes`: weights, overhead and KV at the current budget.
    pub predicted_steady_bytes: u64,
    /// The transient prefill scratch the ledger reserves beside it.
    pub predicted_scratch_bytes: u64,
    /// Predicted weight bytes.
    pub predicted_weights_bytes: u64,
    /// Predicted KV bytes at the full context.
    pub predicted_kv_bytes: u64,
    /// Measured bytes after the last load (None before any).
    pub measured_bytes: Option<u64>,
    /// What the ledger charges now.
    pub charged_bytes: u64,
    /// KV budget in tokens.
    pub kv_budget_tokens: u32,
    /// Pinned.
    pub pinned: bool,
    /// Milliseconds idle, when resident and idle.
    pub idle_ms: u64,
    /// Keep-alive in ms, None for never.
    pub keep_alive_ms: Option<u64>,
    /// Requests running.
    pub in_flight: u32,
    /// Requests waiting.
    pub queued: u32,
    /// Active leases.
    pub leases: u32,
    /// Eviction score (higher stays longer).
    pub score: f64,
    /// Last load's duration.
    pub load_ms: u64,
    /// Loads so far.
    pub loads: u64,
    /// Requests served.
    pub requests: u64,
    /// Served as completion only (no chat template).
    pub completion_only: bool,
    /// Last use, ms since the epoch (None if never).
    pub last_used_unix_ms: Option<u64>,
    /// Tokens generated over every load.
    pub generated_tokens: u64,
    /// Prompt tokens processed.
    pub prompt_tokens: u64,
    /// Generations completed.
    pub completed: u64,
    /// Generations cancelled by their client.
    pub cancelled: u64,
    /// Requests failed in the engine.
    pub failed: u64,
    /// Inputs embedded.
    pub embedded: u64,
    /// Sequences in the running batch now.
    pub running_sequences: u32,
    /// Sequences waiting for admission now.
    pub waiting_sequences: u32,
    /// Sequences paused now because their client stopped reading.
    pub paused_sequences: u32,
    /// Times a sequence paused for its client, so far.
    pub pauses: u64,
    /// The last unload measured on the GPU: bytes freed (0 on CPU).
    pub last_unload_freed_bytes: u64,
    /// What that model's load had measured.
    pub last_unload_load_bytes: u64,
    /// The unload freed under 90% of that.
    pub unload_fell_short: bool,
    /// The most sequences running at once.
    pub max_sequences: u32,
    /// KV blocks held by sequences.
    pub kv_blocks_used: u64,
    /// KV blocks in the pool.
    pub kv_blocks_total: u64,
    /// Positions per KV block.
    pub kv_block_tokens: u32,
    /// Bytes the KV pool holds now.
    pub kv_pool_bytes: u64,
    /// Sequences preempted (KV freed, recomputed later), over every load.
    pub preemptions: u64,
    /// Whether the prefix cache is on.
    pub prefix_cache: bool,
    /// KV blocks the prefix cache keeps that no sequence holds now.
    pub kv_cached_blocks: u64,
    /// Bytes of those blocks (the cache's share of the pool).
    pub kv_cached_bytes: u64,
    /// Admissions that reused cached blocks, over every load.
    pub prefix_cache_hits: u64,
    /// Admissions that found nothing cached, over every load.
    pub prefix_cache_misses: u64,
    /// Prompt tokens served from the cache instead of computed, over every load.
    pub prefix_cached_tokens: u64,
}

/// The daemon's memory.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonInfo {
    /// Version.
    pub version: String,
    /// Device.
    pub device: String,
    /// Governed pool size.
    pub pool_total_bytes: u64,
    /// Ceiling.
    pub ceiling_bytes: u64,
    /// Headroom.
    pub headroom_bytes: u64,
    /// Charged to models.
    pub used_bytes: u64,
    /// Free for loads.
    pub free_bytes: u64,
    /// Available per the OS.
    pub available_bytes: u64,
    /// normal, warning or critical.
    pub pressure: String,
    /// Why.
    pub pressure_reason: String,
    /// Uptime.
    pub uptime_ms: u64,
    /// Loads in flight.
    pub loads_in_flight: u32,
    /// Process bytes in the pool (RSS on CPU).
    pub process_bytes: u64,
    /// Swap-out rate.
    pub swap_out_bytes_per_s: f64,
    /// Which limit sizes the pool: "machine", "device", "cgroup v2 PATH", "cgroup v1 PATH".
    pub pool_source: String,
    /// Transient memory held by requests being prepared now.
    pub request_memory_bytes: u64,
    /// Its budget.
    pub request_memory_budget_bytes: u64,
    /// Requests refused because the budget was full.
    pub requests_refused_for_memory: u64,
    /// On Metal: the working-set limit (0 elsewhere).
    pub metal_working_set_bytes: u64,
    /// On Metal: what this process's Metal resources hold.
    pub metal_allocated_bytes: u64,
    /// On Metal: unified memory in all.
    pub unified_memory_bytes: u64,
}

/// A route.
#[derive(Debug, Clone, Serialize)]
pub struct RouteInfo {
    /// Name.
    pub name: String,
    /// Candidates.
    pub models: Vec<String>,
    /// Strategy.
    pub strategy: String,
}

/// `Status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The daemon.
    pub daemon: DaemonInfo,
    /// The models.
    pub models: Vec<ModelInfo>,
    /// The routes.
    pub routes: Vec<RouteInfo>,
}

impl StatusReport {
    /// A model by name.
    pub fn model(&self, name: &str) -> Option<&ModelInfo> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The measured bytes of the resident models, summed (what the ledger's ceiling must hold in fact).
    pub fn measured_resident_bytes(&self) -> u64 {
        self.models
            .iter()
            .filter(|m| m.state == ModelState::Resident)
            .filter_map(|m| m.measured_bytes)
            .sum()
    }
}

/// What a load did.
#[derive(Debug, Clone, Serialize)]
pub struct LoadOutcome {
    /// The model.
    pub model: String,
    /// False when it was already resident.
    pub loaded_now: bool,
    /// Load time.
    pub load_ms: u64,
    /// Measured bytes.
    pub measured_bytes: u64,
    /// Predicted bytes.
    pub predicted_bytes: u64,
    /// Models evicted to make room.
    pub evicted: Vec<String>,
}

/// What an unload did.
#[derive(Debug, Clone, Serialize)]
pub struct UnloadOutcome {
    /// The model.
    pub model: String,
    /// False when it was not resident.
    pub unloaded: bool,
    /// Bytes freed.
    pub freed_bytes: u64,
}

/// Sampling settings.
#[derive(Debug, Clone, Default)]
pub struct Sampling {
    /// Temperature (0 or None: greedy).
    pub temperature: Option<f32>,
    /// Top-k.
    pub top_k: Option<u32>,
    /// Top-p.
    pub top_p: Option<f32>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Seed.
    pub seed: Option<u64>,
}

/// A generation request.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    /// Model, alias or route.
    pub model: String,
    /// A raw prompt (used when `messages` is empty).
    pub prompt: String,
    /// Chat messages as (role, content).
    pub messages: Vec<(String, String)>,
    /// Most new tokens.
    pub max_tokens: Option<u32>,
    /// Sampling.
    pub sampling: Sampling,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// The output must be JSON valid against this JSON schema (the schema's text).
    pub json_schema: Option<String>,
    /// The output must be a JSON object.
    pub json_object: bool,
}

/// Final statistics of a generation.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateStats {
    /// The model that served it.
    pub model: String,
    /// eos, stop, length or context.
    pub finish_reason: String,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens per second.
    pub prompt_tokens_per_s: f64,
    /// Decode tokens per second.
    pub decode_tokens_per_s: f64,
    /// Load time when this request caused a load.
    pub load_ms: Option<u64>,
    /// Queue time.
    pub queue_ms: u64,
    /// Time to first token.
    pub time_to_first_token_ms: u64,
    /// Total.
    pub total_ms: u64,
    /// Prompt tokens served from the prefix cache (not computed).
    pub cached_tokens: u32,
}

/// One item of a generation stream.
#[derive(Debug, Clone)]
pub enum GenerateEvent {
    /// Text.
    Delta(String),
    /// The end.
    Done(GenerateStats),
}

/// Embeddings.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedOutcome {
    /// The model.
    pub model: String,
    /// One vector per input.
    pub embeddings: Vec<Vec<f32>>,
    /// Tokens in all inputs.
    pub prompt_tokens: u32,
}

/// What loading a model would do.
#[derive(Debug, Clone, Serialize)]
pub struct PlanOutcome {
    /// The model.
    pub model: String,
    /// It would load now.
    pub fits: bool,
    /// Already resident.
    pub already_resident: bool,
    /// Bytes needed.
    pub need_bytes: u64,
    /// Bytes free.
    pub free_bytes: u64,
    /// (model, bytes, score) evicted, in order.
    pub evictions: Vec<(String, u64, f64)>,
    /// Why it would be refused, if so.
    pub refusal: Option<String>,
}

/// What a reload changed (`ultctl reload`).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Models that appeared.
    pub added: Vec<String>,
    /// Models that are gone (unloaded once idle).
    pub removed: Vec<String>,
    /// Models reloaded on their next use (files or serving configuration changed).
    pub reloaded: Vec<String>,
    /// Models whose settings changed in place.
    pub updated: Vec<String>,
    /// Models left as they were.
    pub unchanged: u32,
}

/// A lease.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseInfo {
    /// The model.
    pub model: String,
    /// The id to release it with.
    pub lease_id: u64,
    /// When it expires.
    pub expires_unix_ms: u64,
}

/// A state change from `Watch`.
#[derive(Debug, Clone, Serialize)]
pub struct WatchItem {
    /// Milliseconds since the epoch.
    pub unix_ms: u64,
    /// loading, loaded, evicted, load-failed, pressure, kv-budget.
    pub kind: String,
    /// The model, when the event concerns one.
    pub model: Option<String>,
    /// A description.
    pub detail: String,
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Debug, Clone)]
pub struct TokenInterceptor {
    header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

type Inner = UltClient<tonic::service::interceptor::InterceptedService<Channel, TokenInterceptor>>;

/// A connected client.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Inner,
}

impl Client {
    /// Connects to `addr`: `host:port`, `http://host:port`, or `unix:///path/to/ultd.sock`.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with_token(addr, None).await
    }

    /// Connects, sending `token` as a bearer token with every call.
    pub async fn connect_with_token(addr: &str, token: Option<&str>) -> Result<Self, ClientError> {
        let header = match token {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::InvalidToken)?,
            ),
        };
        let channel = if let Some(path) = addr.strip_prefix("unix://") {
            let path = std::path::PathBuf::from(path);
            // The URI is required by the API and ignored by the connector.
            Endpoint::from_static("http://[::1]:1")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|source| ClientError::connect(addr, &source))?
        } else {
            let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
                addr.to_string()
            } else {
                format!("http://{addr}")
            };
            Endpoint::from_shared(uri)
                .map_err(|_| ClientError::InvalidAddress(addr.to_string()))?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|source| ClientError::connect(addr, &source))?
        };
        Ok(Self {
            inner: UltClient::with_interceptor(channel, TokenInterceptor { header })
                .max_decoding_message_size(64 << 20),
        })
    }

    /// The daemon's memory and every model.
    pub async fn status(&mut self) -> Result<StatusReport, ClientError> {
        let s = self.inner.status(pb::StatusRequest {}).await?.into_inner();
        Ok(status_from(s))
    }

    /// Loads a model, calling `progress(loaded, total)` as bytes load.
    pub async fn load(
        &mut self,
        model: &str,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<LoadOutcome, ClientError> {
        let mut stream = self
            .inner
            .load(pb::LoadRequest {
                model: model.into(),
            })
            .await?
            .into_inner();
        while let Some(item) = stream.next().await {
            match item?.event {
                Some(pb::load_progress::Event::Bytes(b)) => progress(b.loaded_bytes, b.total_bytes),
                Some(pb::load_progress::Event::Done(d)) => {
                    return Ok(LoadOutcome {
                        model: d.model,
                        loaded_now: d.loaded_now,
                        load_ms: d.load_ms,
                        measured_bytes: d.measured_bytes,
                        predicted_bytes: d.predicted_bytes,
                        evicted: d.evicted,
                    });
                }
                None => {}
            }
        }
        Err(ClientError::Truncated)
    }

    /// Unloads a model.
    pub async fn unload(&mut self, model: &str) -> Result<UnloadOutcome, ClientError> {
        let r = self
            .inner
            .unload(pb::UnloadRequest {
                model: model.into(),
            })
            .await?
            .into_inner();
        Ok(UnloadOutcome {
            model: r.model,
            unloaded: r.unloaded,
            freed_bytes: r.freed_bytes,
        })
    }

    /// Starts a generation; the stream yields deltas and then the final statistics.
    pub async fn generate(
        &mut self,
        req: GenerateRequest,
    ) -> Result<BoxStream<'static, Result<GenerateEvent, ClientError>>, ClientError> {
        let input = if req.messages.is_empty() {
            pb::generate_request::Input::Prompt(req.prompt)
        } else {
            pb::generate_request::Input::Messages(pb::Messages {
                messages: req
                    .messages
                    .into_iter()
                    .map(|(role, content)| pb::ChatMessage { role, content })
                    .collect(),
            })
        };
        let s = req.sampling;
        let stream = self
            .inner
            .generate(pb::GenerateRequest {
                model: req.model,
                input: Some(input),
                max_tokens: req.max_tokens,
                sampling: Some(pb::SamplingParams {
                    temperature: s.temperature,
                    top_k: s.top_k,
                    top_p: s.top_p,
                    repetition_penalty: s.repetition_penalty,
                    repeat_last_n: None,
                    seed: s.seed,
                    min_p: None,
                }),
                stop: req.stop,
                ignore_eos: req.ignore_eos,
                format: match (req.json_schema, req.json_object) {
                    (Some(s), _) => Some(pb::generate_request::Format::JsonSchema(s)),
                    (None, true) => Some(pb::generate_request::Format::JsonObject(true)),
                    (None, false) => None,
                },
                logprobs: None,
            })
            .await?
            .into_inner();
        Ok(stream
            .filter_map(|item| async move {
                match item {
                    Err(e) => Some(Err(ClientError::from(e))),
                    Ok(r) => match r.event {
                        Some(pb::generate_response::Event::Delta(t)) => {
                            Some(Ok(GenerateEvent::Delta(t)))
                        }
                        Some(pb::generate_response::Event::Done(d)) => {
                            Some(Ok(GenerateEvent::Done(stats_from(d))))
                        }
                        None => None,
                    },
                }
            })
            .boxed())
    }

    /// Generates to completion, returning the text and statistics.
    pub async fn generate_text(
        &mut self,
        req: GenerateRequest,
    ) -> Result<(String, GenerateStats), ClientError> {
        let mut stream = self.generate(req).await?;
        let mut text = String::new();
        while let Some(event) = stream.next().await {
            match event? {
                GenerateEvent::Delta(t) => text.push_str(&t),
                GenerateEvent::Done(stats) => return Ok((text, stats)),
            }
        }
        Err(ClientError::Truncated)
    }

    /// Embeds texts.
    pub async fn embed(
        &mut self,
        model: &str,
        inputs: Vec<String>,
    ) -> Result<EmbedOutcome, ClientError> {
        let r = self
            .inner
            .embed(pb::EmbedRequest {
                model: model.into(),
                inputs,
            })
            .await?
            .into_inner();
        Ok(EmbedOutcome {
            model: r.model,
            embeddings: r.embeddings.into_iter().map(|e| e.values).collect(),
            prompt_tokens: r.prompt_tokens,
        })
    }

    /// Pins a model (loading it if needed).
    pub async fn pin(&mut self, model: &str) -> Result<String, ClientError> {
        Ok(self
            .inner
            .pin(pb::PinRequest {
                model: model.into(),
            })
            .await?
            .into_inner()
            .model)
    }

    /// Unpins a model.
    pub async fn unpin(&mut self, model: &str) -> Result<String, ClientError> {
        Ok(self
            .inner
            .unpin(pb::PinRequest {
                model: model.into(),
            })
            .await?
            .into_inner()
            .model)
    }

    /// Leases a model for `ttl` (None: the daemon's default).
    pub async fn lease(
        &mut self,
        model: &str,
        ttl: Option<Duration>,
    ) -> Result<LeaseInfo, ClientError> {
        let ttl_ms = ttl.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let r = self
            .inner
            .lease(pb::LeaseRequest {
                model: model.into(),
                ttl_ms,
            })
            .await?
            .into_inner();
        Ok(LeaseInfo {
            model: r.model,
            lease_id: r.lease_id,
            expires_unix_ms: r.expires_unix_ms,
        })
    }

    /// Releases a lease; false when it did not exist.
    pub async fn release(&mut self, lease_id: u64) -> Result<bool, ClientError> {
        match self.inner.release(pb::ReleaseRequest { lease_id }).await {
            Ok(r) => Ok(r.into_inner().released),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(s.into()),
        }
    }

    /// What loading a model would do.
    pub async fn plan_load(&mut self, model: &str) -> Result<PlanOutcome, ClientError> {
        let r = self
            .inner
            .plan_load(pb::PlanLoadRequest {
                model: model.into(),
            })
            .await?
            .into_inner();
        Ok(PlanOutcome {
            model: r.model,
            fits: r.fits,
            already_resident: r.already_resident,
            need_bytes: r.need_bytes,
            free_bytes: r.free_bytes,
            evictions: r
                .evictions
                .into_iter()
                .map(|e| (e.model, e.bytes, e.score))
                .collect(),
            refusal: (!r.refusal.is_empty()).then_some(r.refusal),
        })
    }

    /// Re-reads the daemon's models.toml and rescans its model folders; an invalid file is refused
    /// (`ClientError` with the file, line and key) and nothing changes.
    pub async fn reload(&mut self) -> Result<ReloadOutcome, ClientError> {
        let r = self.inner.reload(pb::ReloadRequest {}).await?.into_inner();
        Ok(ReloadOutcome {
            added: r.added,
            removed: r.removed,
            reloaded: r.reloaded,
            updated: r.updated,
            unchanged: r.unchanged,
        })
    }

    /// State changes as they happen.
    pub async fn watch(
        &mut self,
    ) -> Result<BoxStream<'static, Result<WatchItem, ClientError>>, ClientError> {
        let stream = self.inner.watch(pb::WatchRequest {}).await?.into_inner();
        Ok(stream
            .filter_map(|item| async move {
                match item {
                    Err(e) => Some(Err(ClientError::from(e))),
                    Ok(e) => watch_from(e).map(Ok),
                }
            })
            .boxed())
    }
}

fn state_from(s: i32) -> ModelState {
    match pb::ModelState::try_from(s).unwrap_or(pb::ModelState::Unspecified) {
        pb::ModelState::Loading => ModelState::Loading,
        pb::ModelState::Resident => ModelState::Resident,
        pb::ModelState::Unloading => ModelState::Unloading,
        pb::ModelState::Failed => ModelState::Failed,
        _ => ModelState::Unloaded,
    }
}

fn pressure_name(p: i32) -> &'static str {
    match pb::PressureLevel::try_from(p).unwrap_or(pb::PressureLevel::Unspecified) {
        pb::PressureLevel::Warning => "warning",
        pb::PressureLevel::Critical => "critical",
        _ => "normal",
    }
}

fn status_from(s: pb::StatusResponse) -> StatusReport {
    let d = s.daemon.unwrap_or_default();
    let mem = d.memory.clone().unwrap_or_default();
    StatusReport {
        daemon: DaemonInfo {
            version: d.version,
            device: d.device,
            pool_total_bytes: d.pool_total_bytes,
            ceiling_bytes: d.ceiling_bytes,
            headroom_bytes: d.headroom_bytes,
            used_bytes: d.used_bytes,
            free_bytes: d.free_bytes,
            available_bytes: d.available_bytes,
            pressure: pressure_name(d.pressure).into(),
            pressure_reason: d.pressure_reason,
            uptime_ms: d.uptime_ms,
            loads_in_flight: d.loads_in_flight,
            process_bytes: mem.process_rss_bytes,
            swap_out_bytes_per_s: mem.swap_out_per_s,
            pool_source: d.pool_source,
            request_memory_bytes: d.request_memory_bytes,
            request_memory_budget_bytes: d.request_memory_budget_bytes,
            requests_refused_for_memory: d.requests_refused_for_memory,
            metal_working_set_bytes: d.metal_working_set_bytes,
            metal_allocated_bytes: d.metal_allocated_bytes,
            unified_memory_bytes: d.unified_memory_bytes,
        },
        models: s
            .models
            .into_iter()
            .map(|m| ModelInfo {
                kind: match pb::ModelKind::try_from(m.kind).unwrap_or(pb::ModelKind::Unspecified) {
                    pb::ModelKind::Chat => "chat",
                    pb::ModelKind::Completion => "completion",
                    pb::ModelKind::Embedding => "embedding",
                    pb::ModelKind::Unspecified => "unknown",
                }
                .into(),
                state: state_from(m.state),
                failure: (!m.failure.is_empty()).then_some(m.failure),
                measured_bytes: (m.measured_bytes > 0).then_some(m.measured_bytes),
                keep_alive_ms: u64::try_from(m.keep_alive_ms).ok(),
                last_used_unix_ms: (m.last_used_unix_ms > 0).then_some(m.last_used_unix_ms),
                name: m.name,
                path: m.path,
                origin: m.origin,
                architecture: m.architecture,
                aliases: m.aliases,
                context_tokens: m.context_tokens,
                predicted_bytes: m.predicted_bytes,
                predicted_steady_bytes: m.predicted_steady_bytes,
                predicted_scratch_bytes: m.predicted_scratch_bytes,
                predicted_weights_bytes: m.predicted_weights_bytes,
                predicted_kv_bytes: m.predicted_kv_bytes,
                charged_bytes: m.charged_bytes,
                kv_budget_tokens: m.kv_budget_tokens,
                pinned: m.pinned,
                idle_ms: m.idle_ms,
                in_flight: m.in_flight,
                queued: m.queued,
                leases: m.leases,
                score: m.score,
                load_ms: m.load_ms,
                loads: m.loads,
                requests: m.requests,
                completion_only: m.completion_only,
                generated_tokens: m.generated_tokens,
                prompt_tokens: m.prompt_tokens,
                completed: m.completed,
                cancelled: m.cancelled,
                failed: m.failed,
                embedded: m.embedded,
                running_sequences: m.running_sequences,
                waiting_sequences: m.waiting_sequences,
                paused_sequences: m.paused_sequences,
                pauses: m.pauses,
                last_unload_freed_bytes: m.last_unload_freed_bytes,
                last_unload_load_bytes: m.last_unload_load_bytes,
                unload_fell_short: m.unload_fell_short,
                max_sequences: m.max_sequences,
                kv_blocks_used: m.kv_blocks_used,
                kv_blocks_total: m.kv_blocks_total,
                kv_block_tokens: m.kv_block_tokens,
                kv_pool_bytes: m.kv_pool_bytes,
                preemptions: m.preemptions,
                prefix_cache: m.prefix_cache,
                kv_cached_blocks: m.kv_cached_blocks,
                kv_cached_bytes: m.kv_cached_bytes,
                prefix_cache_hits: m.prefix_cache_hits,
                prefix_cache_misses: m.prefix_cache_misses,
                prefix_cached_tokens: m.prefix_cached_tokens,
            })
            .collect(),
        routes: s
            .routes
            .into_iter()
            .map(|r| RouteInfo {
                name: r.name,
                models: r.models,
                strategy: r.strategy,
            })
            .collect(),
    }
}

fn stats_from(d: pb::GenerateDone) -> GenerateStats {
    let finish = match pb::FinishReason::try_from(d.finish_reason)
        .unwrap_or(pb::FinishReason::Unspecified)
    {
        pb::FinishReason::Eos => "eos",
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Length => "length",
        pb::FinishReason::Context => "context",
        pb::FinishReason::Unspecified => "unknown",
    };
    GenerateStats {
        model: d.model,
        finish_reason: finish.into(),
        prompt_tokens: d.prompt_tokens,
        completion_tokens: d.completion_tokens,
        prompt_tokens_per_s: d.prompt_tokens_per_s,
        decode_tokens_per_s: d.decode_tokens_per_s,
        load_ms: d.load_ms,
        queue_ms: d.queue_ms,
        time_to_first_token_ms: d.time_to_first_token_ms,
        total_ms: d.total_ms,
        cached_tokens: d.cached_tokens,
    }
}

fn watch_from(e: pb::WatchEvent) -> Option<WatchItem> {
    use pb::watch_event::Event as E;
    let (kind, model, detail) = match e.event? {
        E::Loading(l) => (
            "loading",
            Some(l.model),
            format!("predicted {} bytes", l.predicted_bytes),
        ),
        E::Loaded(l) => (
            "loaded",
            Some(l.model),
            format!(
                "{} ms, measured {} bytes (predicted {})",
                l.load_ms, l.measured_bytes, l.predicted_bytes
            ),
        ),
        E::Evicted(v) => (
            "evicted",
            Some(v.model),
            format!("{} ({} bytes)", v.reason, v.freed_bytes),
        ),
        E::LoadFailed(f) => ("load-failed", Some(f.model), f.reason),
        E::Pressure(p) => (
            "pressure",
            None,
            format!("{}: {}", pressure_name(p.level), p.reason),
        ),
        E::KvBudget(k) => ("kv-budget", Some(k.model), format!("{} tokens", k.tokens)),
        E::CacheDropped(c) => ("cache-dropped", Some(c.model), format!("{} bytes", c.bytes)),
    };
    Some(WatchItem {
        unix_ms: e.unix_ms,
        kind: kind.into(),
        model,
        detail,
    })
}

/// Formats bytes for people: "93.8 MiB".
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut value, mut i) = (bytes as f64, 0);
    while value >= 1024.0 && i + 1 < units.len() {
        value /= 1024.0;
        i += 1;
    }
    match i {
        0 => format!("{bytes} B"),
        _ if value < 10.0 => format!("{value:.2} {}", units[i]),
        _ if value < 100.0 => format!("{value:.1} {}", units[i]),
        _ => format!("{value:.0} {}", units[i]),
    }
}
