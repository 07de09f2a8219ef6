//! The `ult.v1.Ult` gRPC service: converts proto messages to ult's own types at this boundary, validates
//! requests, and drives the state owner and workers.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use ult_policy::{LeaseId, PressureLevel, RequestKind, Residency};
use ult_proto::v1 as pb;

use crate::error::ServiceError;
use crate::generation::{AtEos, Core, Event, GenerateRequest, Input, Truncate, pump};
use crate::limits::client_key;
use crate::metrics::Metrics;
use crate::supervisor::{Handle, ModelStatus, StatusView, WatchEvent};
use crate::worker::FinishReason;
use ult_engine::ModelKind;
use ult_engine::constraint::OutputFormat;
use ult_engine::sampler::SamplingParams;
use ult_engine::sequence::TokenLogprob;
use ult_engine::template::ChatMessage;

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The default lease length.
pub const DEFAULT_LEASE_MS: u64 = 5 * 60 * 1000;
/// The longest lease a client may ask for (longer holds are what pins are for).
pub const MAX_LEASE_MS: u64 = 30 * 24 * 3_600_000;

/// The service implementation.
#[derive(Debug, Clone)]
pub struct UltService {
    handle: Handle,
    core: Core,
}

impl UltService {
    /// A service over the state owner behind `handle`, counting into `metrics`.
    pub fn new(handle: Handle, metrics: Arc<Metrics>) -> Self {
        Self {
            core: Core::new(handle.clone(), metrics),
            handle,
        }
    }
}

fn logprob_to_pb(t: TokenLogprob) -> pb::TokenLogprob {
    pb::TokenLogprob {
        token: String::from_utf8_lossy(&t.bytes).into_owned(),
        bytes: t.bytes,
        logprob: t.logprob,
        top: t
            .top
            .into_iter()
            .map(|(_, bytes, logprob)| pb::TopLogprob {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
                logprob,
            })
            .collect(),
    }
}

fn sampling_from(p: Option<pb::SamplingParams>) -> SamplingParams {
    let p = p.unwrap_or_default();
    let d = SamplingParams::default();
    SamplingParams {
        temperature: p.temperature.unwrap_or(d.temperature),
        top_k: p.top_k.map(|k| k as usize),
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty.unwrap_or(d.repetition_penalty),
        repeat_last_n: p.repeat_last_n.map_or(d.repeat_last_n, |n| n as usize),
        seed: p.seed,
    }
}

fn finish_to_pb(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Eos | FinishReason::Cancelled => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Context => pb::FinishReason::Context,
    }
}

fn pressure_to_pb(p: PressureLevel) -> pb::PressureLevel {
    match p {
        PressureLevel::Normal => pb::PressureLevel::Normal,
        PressureLevel::Warning => pb::PressureLevel::Warning,
        PressureLevel::Critical => pb::PressureLevel::Critical,
    }
}

fn kind_to_pb(k: ModelKind) -> pb::ModelKind {
    match k {
        ModelKind::Chat => pb::ModelKind::Chat,
        ModelKind::Completion => pb::ModelKind::Completion,
        ModelKind::Embedding => pb::ModelKind::Embedding,
    }
}

/// Converts a status view to its wire form.
pub fn status_to_pb(s: &StatusView) -> pb::StatusResponse {
    let daemon = pb::DaemonStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        device: s.device.clone(),
        pool_total_bytes: s.pool_total_bytes,
        ceiling_bytes: s.ceiling_bytes,
        headroom_bytes: s.headroom_bytes,
        used_bytes: s.used_bytes,
        free_bytes: s.free_bytes,
        available_bytes: s.available_bytes,
        pressure: pressure_to_pb(s.pressure) as i32,
        pressure_reason: s.pressure_reason.clone(),
        uptime_ms: s.uptime_ms,
        loads_in_flight: s.loads_in_flight,
        memory: s.snapshot.map(|m| pb::MemorySample {
            total_bytes: m.total_bytes,
            available_bytes: m.available_bytes,
            compressed_bytes: m.compressed_bytes,
            swap_used_bytes: m.swap_used_bytes,
            swap_in_per_s: m.swap_in_bytes_per_s,
            swap_out_per_s: m.swap_out_bytes_per_s,
            psi_some_avg10: m.psi_some_avg10.unwrap_or(0.0),
            psi_full_avg10: m.psi_full_avg10.unwrap_or(0.0),
            process_rss_bytes: m.process_bytes,
            source: s.probe_source.clone(),
        }),
        max_resident: s.max_resident,
        pool_source: s
            .snapshot
            .map_or_else(|| "machine".to_string(), |m| m.pool.to_string()),
        metal_working_set_bytes: s
            .snapshot
            .and_then(|m| m.metal)
            .map_or(0, |m| m.working_set_limit),
        metal_allocated_bytes: s.snapshot.and_then(|m| m.metal).map_or(0, |m| m.allocated),
        unified_memory_bytes: s
            .snapshot
            .and_then(|m| m.metal)
            .map_or(0, |m| m.unified_total),
        request_memory_bytes: 0,
        request_memory_budget_bytes: 0,
        requests_refused_for_memory: 0,
    };
    pb::StatusResponse {
        daemon: Some(daemon),
        models: s.models.iter().map(model_to_pb).collect(),
        routes: s
            .routes
            .iter()
            .map(|r| pb::RouteStatus {
                name: r.name.clone(),
                models: r.models.clone(),
                strategy: r.strategy.as_str().into(),
            })
            .collect(),
    }
}

fn model_to_pb(m: &ModelStatus) -> pb::ModelStatus {
    let reg = &m.model;
    let insp = reg.inspection.as_ref().ok();
    let f = insp.map(|i| i.footprint).unwrap_or_default();
    let mut out = pb::ModelStatus {
        name: reg.config.name.clone(),
        kind: kind_to_pb(insp.map_or(reg.config.kind, |i| i.kind)) as i32,
        path: reg.config.path.display().to_string(),
        origin: reg.config.origin.clone(),
        architecture: insp.map(|i| i.architecture.clone()).unwrap_or_default(),
        aliases: reg.config.aliases.clone(),
        context_tokens: insp.map_or(0, |i| i.context as u32),
        predicted_weights_bytes: f.weights_bytes,
        predicted_kv_bytes: f.kv_bytes(f.context_tokens),
        predicted_overhead_bytes: f.overhead_bytes + f.scratch_bytes,
        predicted_bytes: f.total(),
        predicted_steady_bytes: f.steady_bytes() + f.kv_bytes(f.context_tokens),
        predicted_scratch_bytes: f.scratch_bytes,
        kv_bytes_per_token: f.kv_bytes_per_token,
        keep_alive_ms: reg.config.keep_alive.as_wire_ms(),
        completion_only: insp.is_some_and(|i| i.kind == ModelKind::Completion),
        priority: reg.config.priority,
        last_used_unix_ms: m.last_used_unix_ms.unwrap_or(0),
        prompt_tokens: m.counters.prompt_tokens,
        generated_tokens: m.counters.generated_tokens,
        completed: m.counters.completed,
        cancelled: m.counters.cancelled,
        failed: m.counters.failed,
        embedded: m.counters.embedded,
        preemptions: m.counters.preemptions,
        last_unload_freed_bytes: m.last_unload.map_or(0, |u| u.0),
        last_unload_load_bytes: m.last_unload.map_or(0, |u| u.1),
        unload_fell_short: m
            .last_unload
            .is_some_and(|(freed, load)| crate::supervisor::unload_fell_short(freed, load)),
        prefix_cache: reg.config.prefix_cache,
        prefix_cache_hits: m.counters.cache_hits,
        prefix_cache_misses: m.counters.cache_misses,
        prefix_cached_tokens: m.counters.cache_tokens_saved,
        max_sequences: f.max_sequences,
        kv_block_tokens: f.kv_block_tokens,
        ..Default::default()
    };
    if let Some(b) = m.batch {
        let small = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        out.running_sequences = small(b.running);
        out.waiting_sequences = small(b.waiting);
        out.paused_sequences = small(b.paused);
        out.pauses = b.pauses;
        out.kv_blocks_used = b.kv_blocks_used;
        out.kv_blocks_total = b.kv_blocks_total;
        out.kv_pool_bytes = b.kv_pool_bytes;
        out.kv_cached_blocks = b.kv_cached_blocks;
        out.kv_cached_bytes = b.kv_cached_bytes;
    }
    match (&reg.inspection, &m.view) {
        (Err(reason), _) => {
            out.state = pb::ModelState::Failed as i32;
            out.failure = reason.clone();
        }
        (Ok(_), Some(v)) => {
            out.state = match v.residency {
                Residency::Unloaded => pb::ModelState::Unloaded,
                Residency::Loading => pb::ModelState::Loading,
                Residency::Resident => pb::ModelState::Resident,
                Residency::Unloading => pb::ModelState::Unloading,
                Residency::Failed => pb::ModelState::Failed,
            } as i32;
            out.failure = v.failure.clone().unwrap_or_default();
            out.measured_bytes = v.measured_bytes.unwrap_or(0);
            out.charged_bytes = v.charged_bytes;
            out.kv_budget_tokens = v.kv_tokens;
            out.predicted_steady_bytes = f.steady_bytes() + f.kv_bytes(v.kv_tokens);
            out.keep_alive_ms = v.keep_alive.as_wire_ms();
            out.pinned = v.pinned;
            out.idle_ms = v.idle_ms.unwrap_or(0);
            out.in_flight = v.in_flight;
            out.queued = v.queued;
            out.leases = v.leases;
            out.score = v.score;
            out.load_ms = v.load_ms.unwrap_or(0);
            out.loads = v.loads;
            out.requests = v.requests;
        }
        (Ok(_), None) => out.state = pb::ModelState::Unloaded as i32,
    }
    out
}

fn watch_to_pb(unix_ms: u64, e: WatchEvent) -> Option<pb::WatchEvent> {
    use pb::watch_event::Event as E;
    let event = match e {
        WatchEvent::Loading {
            model,
            predicted_bytes,
        } => E::Loading(pb::ModelLoading {
            model,
            predicted_bytes,
        }),
        WatchEvent::Loaded {
            model,
            load_ms,
            measured_bytes,
            predicted_bytes,
        } => E::Loaded(pb::ModelLoaded {
            model,
            load_ms,
            measured_bytes,
            predicted_bytes,
        }),
        WatchEvent::LoadFailed { model, reason } => {
            E::LoadFailed(pb::ModelLoadFailed { model, reason })
        }
        WatchEvent::Evicted {
            model,
            reason,
            freed_bytes,
        } => E::Evicted(pb::ModelEvicted {
            model,
            reason,
            freed_bytes,
        }),
        WatchEvent::Pressure { level, reason } => E::Pressure(pb::PressureChanged {
            level: pressure_to_pb(level) as i32,
            reason,
        }),
        WatchEvent::KvBudget { model, tokens } => {
            E::KvBudget(pb::KvBudgetChanged { model, tokens })
        }
        WatchEvent::CacheDropped { model, bytes } => {
            E::CacheDropped(pb::CacheDropped { model, bytes })
        }
        WatchEvent::Progress { .. } => return None,
    };
    Some(pb::WatchEvent {
        unix_ms,
        event: Some(event),
    })
}

#[tonic::async_trait]
impl pb::ult_server::Ult for UltService {
    type LoadStream = Stream2<pb::LoadProgress>;
    type WatchStream = Stream2<pb::WatchEvent>;
    type GenerateStream = Stream2<pb::GenerateResponse>;

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn load(
        &self,
        request: Request<pb::LoadRequest>,
    ) -> Result<Response<Self::LoadStream>, Status> {
        let m = self.handle.resolve(&request.get_ref().model).await?;
        let model = m.config.name.clone();
        let mut events = self.handle.subscribe();
        let (tx, rx) = mpsc::channel(64);
        let handle = self.handle.clone();
        tokio::spawn(async move {
            // Comparable with the measurement: steady bytes and the KV budget (scratch is transient).
            let predicted = m.inspection.as_ref().map_or(0, |i| {
                i.footprint.steady_bytes() + i.footprint.kv_bytes(i.footprint.context_tokens)
            });
            let acquire = handle.acquire(&model, RequestKind::Load);
            tokio::pin!(acquire);
            loop {
                tokio::select! {
                    result = &mut acquire => {
                        let msg = result.map(|g| pb::LoadProgress {
                            event: Some(pb::load_progress::Event::Done(pb::LoadDone {
                                model: model.clone(),
                                loaded_now: g.load_ms.is_some(),
                                load_ms: g.load_ms.unwrap_or(0),
                                measured_bytes: g.measured_bytes.unwrap_or(0),
                                predicted_bytes: predicted,
                                evicted: g.evicted.clone(),
                            })),
                        });
                        let _ = tx.send(msg.map_err(Status::from)).await;
                        break;
                    }
                    event = events.recv() => {
                        if let Ok(crate::supervisor::Stamped { event: WatchEvent::Progress { model: m, loaded_bytes, total_bytes }, .. }) = event
                            && m == model
                        {
                            let p = pb::LoadProgress { event: Some(pb::load_progress::Event::Bytes(pb::LoadBytes { model: m, loaded_bytes, total_bytes })) };
                            if tx.send(Ok(p)).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn unload(
        &self,
        request: Request<pb::UnloadRequest>,
    ) -> Result<Response<pb::UnloadResponse>, Status> {
        let name = request.into_inner().model;
        let m = self.handle.resolve(&name).await?;
        let u = self.handle.unload(&m.config.name).await?;
        Ok(Response::new(pb::UnloadResponse {
            model: m.config.name.clone(),
            unloaded: u.unloaded,
            freed_bytes: u.freed_bytes,
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.handle.status().await?;
        let mut out = status_to_pb(&s);
        if let Some(d) = out.daemon.as_mut() {
            let work = self.handle.work();
            d.request_memory_bytes = work.in_flight_bytes();
            d.request_memory_budget_bytes = work.budget();
            d.requests_refused_for_memory = work.refused();
        }
        Ok(Response::new(out))
    }

    async fn watch(
        &self,
        _request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut events = self.handle.subscribe();
        let mut end = self.handle.streams_end();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    _ = end.changed() => break,
                };
                match event {
                    Ok(e) => {
                        if let Some(p) = watch_to_pb(e.unix_ms, e.event)
                            && tx.send(Ok(p)).await.is_err()
                        {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "a watcher fell behind");
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let client = client_key(request.remote_addr());
        let req = request.into_inner();
        let input = match req.input {
            Some(pb::generate_request::Input::Prompt(p)) => Input::Prompt(p),
            Some(pb::generate_request::Input::Messages(ms)) => Input::Messages(
                ms.messages
                    .into_iter()
                    .map(|m| ChatMessage::new(m.role, m.content))
                    .collect(),
            ),
            None => return Err(ServiceError::invalid("input", "set prompt or messages").into()),
        };
        let format = match req.format {
            None => OutputFormat::Text,
            Some(pb::generate_request::Format::JsonObject(true)) => OutputFormat::JsonObject,
            Some(pb::generate_request::Format::JsonObject(false)) => OutputFormat::Text,
            Some(pb::generate_request::Format::JsonSchema(s)) => {
                OutputFormat::JsonSchema(serde_json::from_str(&s).map_err(|e| {
                    Status::from(ServiceError::invalid(
                        "json_schema",
                        format!("not JSON: {e}"),
                    ))
                })?)
            }
            Some(pb::generate_request::Format::LarkGrammar(g)) => OutputFormat::Lark(g),
        };
        let request = GenerateRequest {
            max_tokens: req.max_tokens,
            sampling: sampling_from(req.sampling),
            stop: req.stop,
            at_eos: if req.ignore_eos {
                AtEos::Continue
            } else {
                AtEos::Stop
            },
            format,
            logprobs: req.logprobs.map(|n| n as usize),
            ..GenerateRequest::new(req.model, input)
        };
        let g = self.core.generate(&client, request).await?;
        let (tx, rx) = mpsc::channel(64);
        let write_timeout = self.core.handle().write_timeout();
        tokio::spawn(pump(g, tx, write_timeout, |g, event| {
            let msg = match event {
                Ok(Event::Delta(d)) => Ok(pb::GenerateResponse {
                    event: Some(pb::generate_response::Event::Delta(d.text)),
                    logprobs: d.logprobs.into_iter().map(logprob_to_pb).collect(),
                }),
                // gRPC requests carry no tools.
                Ok(Event::ToolCalls(_)) => return Vec::new(),
                Ok(Event::Done(s)) => Ok(pb::GenerateResponse {
                    event: Some(pb::generate_response::Event::Done(pb::GenerateDone {
                        model: g.model().to_string(),
                        finish_reason: finish_to_pb(s.finish) as i32,
                        prompt_tokens: s.prompt_tokens as u32,
                        completion_tokens: s.completion_tokens as u32,
                        prompt_tokens_per_s: s.prompt_tps(),
                        decode_tokens_per_s: s.decode_tps(),
                        load_ms: g.load_ms(),
                        queue_ms: s.queue_ms as u64,
                        time_to_first_token_ms: s.ttft_ms as u64,
                        total_ms: s.total_ms as u64,
                        cached_tokens: s.cached_tokens as u32,
                    })),
                    logprobs: Vec::new(),
                }),
                Err(e) => Err(Status::from(e)),
            };
            vec![msg]
        }));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let client = client_key(request.remote_addr());
        let req = request.into_inner();
        let e = self
            .core
            .embed(&client, &req.model, &req.inputs, Truncate::Refuse, None)
            .await?;
        Ok(Response::new(pb::EmbedResponse {
            model: e.model,
            embeddings: e
                .vectors
                .into_iter()
                .map(|values| pb::Embedding { values })
                .collect(),
            prompt_tokens: e.prompt_tokens as u32,
            load_ms: e.load_ms,
        }))
    }

    async fn pin(
        &self,
        request: Request<pb::PinRequest>,
    ) -> Result<Response<pb::PinResponse>, Status> {
        let model = self.handle.pin(&request.into_inner().model, true).await?;
        Ok(Response::new(pb::PinResponse {
            model,
            pinned: true,
        }))
    }

    async fn unpin(
        &self,
        request: Request<pb::PinRequest>,
    ) -> Result<Response<pb::PinResponse>, Status> {
        let model = self.handle.pin(&request.into_inner().model, false).await?;
        Ok(Response::new(pb::PinResponse {
            model,
            pinned: false,
        }))
    }

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let req = request.into_inner();
        let ttl = match req.ttl_ms {
            0 => DEFAULT_LEASE_MS,
            t if t > MAX_LEASE_MS => {
                return Err(ServiceError::invalid(
                    "ttl_ms",
                    format!("{t} ms is longer than the longest lease, {MAX_LEASE_MS} ms (30 days); pin the model instead"),
                )
                .into());
            }
            t => t,
        };
        let (model, lease, expires) = self.handle.lease(&req.model, ttl).await?;
        Ok(Response::new(pb::LeaseResponse {
            model,
            lease_id: lease.0,
            expires_unix_ms: expires,
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let released = self
            .handle
            .release(LeaseId(request.into_inner().lease_id))
            .await?;
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn plan_load(
        &self,
        request: Request<pb::PlanLoadRequest>,
    ) -> Result<Response<pb::PlanLoadResponse>, Status> {
        let m = self.handle.resolve(&request.into_inner().model).await?;
        let p = self.handle.plan_load(&m.config.name).await?;
        Ok(Response::new(pb::PlanLoadResponse {
            model: p.model,
            fits: p.fits,
            already_resident: p.already_resident,
            need_bytes: p.need_bytes,
            free_bytes: p.free_bytes,
            evictions: p
                .victims
                .into_iter()
                .map(|v| pb::PlannedEviction {
                    model: v.model,
                    bytes: v.bytes,
                    score: v.score,
                })
                .collect(),
            refusal: p.refusal.map(|r| r.to_string()).unwrap_or_else(|| {
                if p.would_wait {
                    "busy models hold the memory; the load would wait for them".into()
                } else {
                    String::new()
                }
            }),
        }))
    }

    async fn reload(
        &self,
        _request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let s = self.handle.reload().await?;
        Ok(Response::new(pb::ReloadResponse {
            added: s.added,
            removed: s.removed,
            reloaded: s.reloaded,
            updated: s.updated,
            unchanged: u32::try_from(s.unchanged).unwrap_or(u32::MAX),
        }))
    }
}
