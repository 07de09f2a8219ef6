//! The request path shared by the gRPC service and the HTTP API: validate a request against its model,
//! tokenize it, wait for admission (loading the model if needed), and hand the work to the model's worker.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use ult_policy::RequestKind;

use crate::error::ServiceError;
use crate::limits::ClientSlot;
use crate::registry::RegisteredModel;
use crate::requests::RequestWork;
use crate::supervisor::{Grant, Handle, check_kind};
use crate::worker::{Backlog, EmbedJob, GenEvent, GenerateJob, Job};
use ult_engine::sampler::SamplingParams;
use ult_engine::template::ChatMessage;
use ult_engine::{EngineError, Inspection, ModelKind};

/// Limits on request contents.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// The longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// The most inputs in one embedding request.
pub const MAX_EMBED_INPUTS: usize = 256;
/// A validated generation request, in ult's own types.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop sequences.
    pub stop: Vec<String>,
}

/// What a generation request asks for before validation.
#[derive(Debug, Clone)]
pub enum Input {
    /// A raw prompt.
    Prompt(String),
    /// Chat messages.
    Messages(Vec<ChatMessage>),
}

impl Input {
    /// The bytes of text it carries (a lower bound of the rendered prompt's).
    pub fn bytes(&self) -> usize {
        match self {
            Self::Prompt(p) => p.len(),
            Self::Messages(ms) => ms.iter().map(|m| m.content.len() + m.role.len()).sum(),
        }
    }
}

/// Checks a generation request against the model and tokenizes it.
pub fn prepare_generation(
    model: &RegisteredModel,
    input: Input,
    max_tokens: Option<u32>,
    sampling: SamplingParams,
    stop: Vec<String>,
) -> Result<GenerateParams, ServiceError> {
    let name = &model.config.name;
    let inspection: &Inspection =
        model
            .inspection
            .as_ref()
            .map_err(|r| ServiceError::Unavailable {
                model: name.clone(),
                reason: r.clone(),
            })?;
    let context = inspection.context;
    let tokenizer = &inspection.tokenizer;
    // The prompt must leave room for one generated token; a text longer than that many of the
    // vocabulary's longest pieces cannot fit, so it is refused before any templating or tokenizing.
    let limit = context.saturating_sub(1);
    let too_long = |bytes: usize, at_least: usize| ServiceError::PromptTooLong {
        model: name.clone(),
        bytes,
        limit,
        at_least,
        context_tokens: context,
    };
    let bytes = input.bytes();
    tokenizer
        .fits_by_length(bytes, limit)
        .map_err(|e| too_long(bytes, e.at_least))?;
    let text = match input {
        Input::Prompt(p) => {
            check_kind(model, ModelKind::Completion)?;
            p
        }
        Input::Messages(messages) => {
            check_kind(model, ModelKind::Chat)?;
            if messages.is_empty() {
                return Err(ServiceError::invalid("messages", "no messages"));
            }
            if let Some(m) = messages
                .iter()
                .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool"))
            {
                return Err(ServiceError::invalid(
                    "messages",
                    format!("unknown role {:?}", m.role),
                ));
            }
            let template =
                inspection
                    .template
                    .as_ref()
                    .ok_or_else(|| ServiceError::NoChatTemplate {
                        model: name.clone(),
                    })?;
            template.render(&messages, true)?
        }
    };
    if text.is_empty() {
        return Err(ServiceError::Engine(EngineError::EmptyPrompt));
    }
    sampling.validate()?;
    let max_tokens = match max_tokens {
        Some(0) => return Err(ServiceError::invalid("max_tokens", "must be at least 1")),
        Some(n) if n as usize > context => {
            return Err(ServiceError::invalid(
                "max_tokens",
                format!("{n} exceeds model {name}'s context of {context} tokens"),
            ));
        }
        Some(n) => n as usize,
        None => context,
    };
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(ServiceError::invalid(
            "stop",
            format!("{} sequences; at most {MAX_STOP_SEQUENCES}", stop.len()),
        ));
    }
    if let Some(s) = stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ServiceError::invalid(
            "stop",
            format!("stop sequence {s:?} must have 1 to {MAX_STOP_BYTES} bytes"),
        ));
    }
    let bos_text = tokenizer
        .bos()
        .map(|b| tokenizer.piece_text(b))
        .unwrap_or_default();
    let add_bos = bos_text.is_empty() || !text.starts_with(&bos_text);
    let prompt = tokenizer
        .encode_limited(&text, add_bos, limit)
        .map_err(|e| too_long(text.len(), e.at_least))?;
    Ok(GenerateParams {
        prompt,
        max_tokens,
        sampling,
        stop,
    })
}

/// Runs [`prepare_generation`] on a preparation thread, holding its memory estimate from the request
/// budget while it runs (a prompt too long for the model is refused before either).
async fn prepare(
    handle: &Handle,
    m: &Arc<RegisteredModel>,
    input: Input,
    max_tokens: Option<u32>,
    sampling: SamplingParams,
    stop: Vec<String>,
) -> Result<GenerateParams, ServiceError> {
    let bytes = input.bytes();
    let tokenized = match &m.inspection {
        Ok(i) => bytes.min(i.tokenizer.max_bytes_for(i.context)),
        Err(_) => 0,
    };
    let _reservation = handle
        .work()
        .reserve(RequestWork::estimate(bytes, tokenized))?;
    let m = m.clone();
    handle
        .work()
        .run(move || prepare_generation(&m, input, max_tokens, sampling, stop))
        .await?
}

/// A generation in flight. Holding it keeps the request in flight for the policy; dropping it ends the
/// request and cancels the worker's job at its next decode step.
///
/// The fields are private on purpose: a task that used only the event receiver would capture that field
/// alone, drop the grant early, and let the policy evict a model that is still generating.
#[derive(Debug)]
pub struct Generation {
    model: String,
    load_ms: Option<u64>,
    events: mpsc::UnboundedReceiver<GenEvent>,
    backlog: Backlog,
    end: tokio::sync::watch::Receiver<bool>,
    grace_ms: u64,
    /// Held, never read: dropping it tells the state owner the request is done.
    #[allow(dead_code)]
    grant: Grant,
    /// Held, never read: dropping it frees the client's slot.
    #[allow(dead_code)]
    slot: ClientSlot,
}

impl Generation {
    /// The model serving it.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Set when this request caused the model's load.
    pub fn load_ms(&self) -> Option<u64> {
        self.load_ms
    }

    /// The next event from the worker (None once it is gone), or `EndedByShutdown` when the daemon's
    /// shutdown grace period ran out.
    pub async fn next(&mut self) -> Result<Option<GenEvent>, ServiceError> {
        let ended = ServiceError::EndedByShutdown {
            grace_ms: self.grace_ms,
        };
        if *self.end.borrow() {
            return Err(ended);
        }
        let event = tokio::select! {
            event = self.events.recv() => event,
            changed = self.end.changed() => match changed {
                Ok(()) if *self.end.borrow() => return Err(ended),
                _ => self.events.recv().await,
            },
        };
        if matches!(event, Some(GenEvent::Delta(_))) {
            self.backlog.taken();
        }
        Ok(event)
    }
}

/// Validates `input` against the model behind `name`, takes a slot of `client`'s, waits for admission,
/// and starts generating.
#[allow(clippy::too_many_arguments)]
pub async fn start_generation(
    handle: &Handle,
    client: &str,
    name: &str,
    input: Input,
    max_tokens: Option<u32>,
    sampling: SamplingParams,
    stop: Vec<String>,
    ignore_eos: bool,
) -> Result<Generation, ServiceError> {
    let submitted = Instant::now();
    let slot = handle.limits().acquire(client)?;
    let m = handle.resolve(name).await?;
    let params = prepare(handle, &m, input, max_tokens, sampling, stop).await?;
    let grant = handle.acquire(&m.config.name, RequestKind::Use).await?;
    let jobs = grant
        .jobs
        .clone()
        .ok_or(ServiceError::Engine(EngineError::WorkerGone))?;
    let (events_tx, events) = mpsc::unbounded_channel();
    let backlog = Backlog::default();
    jobs.submit(Job::Generate(GenerateJob {
        backlog: backlog.clone(),
        prompt: params.prompt,
        max_tokens: params.max_tokens,
        sampling: params.sampling,
        stop: params.stop,
        ignore_eos,
        events: events_tx,
        submitted,
    }))?;
    Ok(Generation {
        model: m.config.name.clone(),
        load_ms: grant.load_ms,
        events,
        backlog,
        end: handle.streams_end(),
        grace_ms: handle.grace_ms(),
        grant,
        slot,
    })
}

/// Embeddings of `inputs`, with the model that computed them, the prompt tokens and the load time if this
/// request caused a load.
#[derive(Debug)]
pub struct Embedded {
    /// The model.
    pub model: String,
    /// One vector per input.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens in all inputs.
    pub prompt_tokens: usize,
    /// Load time, when this request caused the load.
    pub load_ms: Option<u64>,
}

/// Validates and embeds `inputs` with the embedding model behind `name`, holding a slot of `client`'s.
pub async fn embed(
    handle: &Handle,
    client: &str,
    name: &str,
    inputs: &[String],
) -> Result<Embedded, ServiceError> {
    let _slot = handle.limits().acquire(client)?;
    let m: Arc<RegisteredModel> = handle.resolve(name).await?;
    check_kind(&m, ModelKind::Embedding)?;
    let insp: Arc<Inspection> = m
        .inspection
        .clone()
        .map_err(|r| ServiceError::Unavailable {
            model: m.config.name.clone(),
            reason: r,
        })?;
    if inputs.is_empty() {
        return Err(ServiceError::invalid("input", "no inputs"));
    }
    if inputs.len() > MAX_EMBED_INPUTS {
        return Err(ServiceError::invalid(
            "input",
            format!("{} inputs; at most {MAX_EMBED_INPUTS}", inputs.len()),
        ));
    }
    let limit = insp.context;
    let too_long = |bytes: usize, at_least: usize| ServiceError::PromptTooLong {
        model: m.config.name.clone(),
        bytes,
        limit,
        at_least,
        context_tokens: insp.context,
    };
    for text in inputs {
        if text.is_empty() {
            return Err(ServiceError::invalid("input", "an input is empty"));
        }
        insp.tokenizer
            .fits_by_length(text.len(), limit)
            .map_err(|e| too_long(text.len(), e.at_least))?;
    }
    let bytes: usize = inputs.iter().map(String::len).sum();
    let _reservation = handle.work().reserve(RequestWork::estimate(bytes, bytes))?;
    let texts = inputs.to_vec();
    let tokenizer_of = insp.clone();
    let encoded = handle
        .work()
        .run(move || {
            texts
                .iter()
                .map(|t| {
                    tokenizer_of
                        .tokenizer
                        .encode_limited(t, true, limit)
                        .map_err(|e| (t.len(), e.at_least))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    let tokenized = encoded.map_err(|(bytes, at_least)| too_long(bytes, at_least))?;
    let prompt_tokens = tokenized.iter().map(Vec::len).sum();
    let grant = handle.acquire(&m.config.name, RequestKind::Use).await?;
    let jobs = grant
        .jobs
        .clone()
        .ok_or(ServiceError::Engine(EngineError::WorkerGone))?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    jobs.submit(Job::Embed(EmbedJob {
        inputs: tokenized,
        reply,
    }))?;
    let vectors = rx
        .await
        .map_err(|_| ServiceError::Engine(EngineError::WorkerGone))??;
    Ok(Embedded {
        model: m.config.name.clone(),
        vectors,
        prompt_tokens,
        load_ms: grant.load_ms,
    })
}
