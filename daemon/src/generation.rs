//! The request core every front door translates into (gRPC, the OpenAI API, Ollama's API): a typed
//! [`GenerateRequest`] is validated against its model, templated and tokenized on the request threads
//! (never on the async runtime), admitted (loading the model if needed) and handed to the model's worker.
//! Metrics are recorded here, once per request, whichever front it came through: refusals when it starts,
//! then its outcome when it ends (a [`Generation`] dropped before its end counts as cancelled).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use ult_policy::{KeepAlive, RequestKind};

use crate::error::ServiceError;
use crate::limits::ClientSlot;
use crate::metrics::{Metrics, outcome_of};
use crate::registry::RegisteredModel;
use crate::requests::RequestWork;
use crate::supervisor::{Grant, Handle, check_kind};
use crate::tools::{Dialect, ToolCall, ToolChoice, ToolReading, Tools};
use crate::worker::{Backlog, Delta, EmbedJob, GenEvent, GenStats, GenerateJob, Job};
use ult_engine::constraint::{Constraint, OutputFormat};
use ult_engine::sampler::SamplingParams;
use ult_engine::sequence::TokenLogprob;
use ult_engine::template::ChatMessage;
use ult_engine::{EngineError, Inspection, ModelKind};

/// Limits on request contents.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// The longest stop sequence, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// The most inputs in one embedding request.
pub const MAX_EMBED_INPUTS: usize = 256;
/// The most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// The largest JSON schema or grammar, in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 256 * 1024;

/// What a generation asks for before validation.
#[derive(Debug, Clone)]
pub enum Input {
    /// A raw prompt, tokenized as it is.
    Prompt(String),
    /// Chat messages, rendered with the model's template.
    Messages(Vec<ChatMessage>),
}

impl Input {
    /// The bytes of text it carries (a lower bound of the rendered prompt's).
    pub fn bytes(&self) -> usize {
        match self {
            Self::Prompt(p) => p.len(),
            Self::Messages(ms) => ms
                .iter()
                .map(|m| {
                    m.content.len()
                        + m.role.len()
                        + m.tool_calls.as_ref().map_or(0, |c| c.to_string().len())
                })
                .sum(),
        }
    }
}

/// What an end-of-sequence token does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AtEos {
    /// It ends the generation.
    #[default]
    Stop,
    /// Generation goes on past it (benchmarks that need exactly `max_tokens`).
    Continue,
}

/// A generation request from any front door, in ult's own types.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The model or route name.
    pub model: String,
    /// The prompt or the conversation.
    pub input: Input,
    /// The most tokens to generate (None: until the context is full).
    pub max_tokens: Option<u32>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// What an end-of-sequence token does.
    pub at_eos: AtEos,
    /// The shape the output must have.
    pub format: OutputFormat,
    /// Log-probabilities of each token, with this many alternatives.
    pub logprobs: Option<usize>,
    /// Tools the model may call (chat only).
    pub tools: Option<Tools>,
    /// The positions this request may use, prompt and answer together, when smaller than the model's
    /// context (Ollama's `num_ctx`).
    pub window: Option<usize>,
    /// The model's keep-alive once this request ends, until another request sets one (None leaves it as
    /// it is: the configured one, unless an earlier request chose another while it stayed resident).
    pub keep_alive: Option<KeepAlive>,
}

impl GenerateRequest {
    /// A request of `input` to `model` with every option at its default.
    pub fn new(model: impl Into<String>, input: Input) -> Self {
        Self {
            model: model.into(),
            input,
            max_tokens: None,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            at_eos: AtEos::Stop,
            format: OutputFormat::Text,
            logprobs: None,
            tools: None,
            window: None,
            keep_alive: None,
        }
    }
}

/// A validated generation request, ready for a worker.
#[derive(Debug)]
pub struct GenerateParams {
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// The output grammar, compiled.
    pub constraint: Option<Constraint>,
    /// How tool calls are read back from the answer, when the request has tools.
    pub tools: Option<ToolReading>,
}

fn check_format(format: &OutputFormat) -> Result<(), ServiceError> {
    let bytes = match format {
        OutputFormat::Text | OutputFormat::JsonObject => 0,
        OutputFormat::JsonSchema(s) => {
            if !s.is_object() && !s.is_boolean() {
                return Err(ServiceError::invalid(
                    "response_format",
                    "the schema must be a JSON object",
                ));
            }
            s.to_string().len()
        }
        OutputFormat::Lark(g) => g.len(),
    };
    if bytes > MAX_GRAMMAR_BYTES {
        return Err(ServiceError::invalid(
            "response_format",
            format!("the schema has {bytes} bytes; at most {MAX_GRAMMAR_BYTES}"),
        ));
    }
    Ok(())
}

/// Checks a generation request against the model, renders and tokenizes it, and compiles its grammar.
pub fn prepare_generation(
    model: &RegisteredModel,
    req: &GenerateRequest,
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
    let context = req
        .window
        .map_or(inspection.context, |w| w.clamp(2, inspection.context));
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
    let bytes = req.input.bytes();
    tokenizer
        .fits_by_length(bytes, limit)
        .map_err(|e| too_long(bytes, e.at_least))?;
    check_format(&req.format)?;
    if let Some(n) = req.logprobs
        && n > MAX_TOP_LOGPROBS
    {
        return Err(ServiceError::invalid(
            "top_logprobs",
            format!("{n} alternatives; at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    let tools = req.tools.as_ref().filter(|t| t.choice != ToolChoice::None);
    let mut format = req.format.clone();
    let mut dialect = None;
    let text = match &req.input {
        Input::Prompt(p) => {
            check_kind(model, ModelKind::Completion)?;
            if tools.is_some() {
                return Err(ServiceError::invalid(
                    "tools",
                    "tools need chat messages, not a raw prompt",
                ));
            }
            p.clone()
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
            match tools {
                None => template.render(messages, true)?,
                Some(t) => {
                    t.validate()?;
                    if !format.is_text() {
                        return Err(ServiceError::invalid(
                            "response_format",
                            "a structured output and tools cannot be combined; give one",
                        ));
                    }
                    let d = if template.renders_tools() && template.hermes_tools() {
                        Dialect::Hermes
                    } else {
                        Dialect::Generic
                    };
                    let plan = t.plan(d, messages.clone());
                    format = plan.format;
                    dialect = Some(ToolReading {
                        dialect: d,
                        parallel: t.parallel,
                    });
                    template.render_with_tools(
                        &plan.messages,
                        plan.template_tools.as_ref(),
                        true,
                    )?
                }
            }
        }
    };
    if text.is_empty() {
        return Err(ServiceError::Engine(EngineError::EmptyPrompt));
    }
    req.sampling.validate()?;
    let max_tokens = match req.max_tokens {
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
    let stop = &req.stop;
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
    let constraint = if format.is_text() {
        None
    } else {
        tokenizer.grammar()?.compile(&format)?
    };
    let bos_text = tokenizer
        .bos()
        .map(|b| tokenizer.piece_text(b))
        .unwrap_or_default();
    let add_bos = bos_text.is_empty() || !text.starts_with(&bos_text);
    let prompt = tokenizer
        .encode_limited(&text, add_bos, limit)
        .map_err(|e| too_long(text.len(), e.at_least))?;
    Ok(GenerateParams {
        // A window smaller than the context ends the answer where the window does.
        max_tokens: if req.window.is_some() {
            max_tokens.min(context - prompt.len())
        } else {
            max_tokens
        },
        prompt,
        constraint,
        tools: dialect,
    })
}

/// Runs [`prepare_generation`] on a request thread, holding its memory estimate from the request budget
/// while it runs (a prompt too long for the model is refused before either).
async fn prepare(
    handle: &Handle,
    m: &Arc<RegisteredModel>,
    req: GenerateRequest,
) -> Result<(GenerateParams, GenerateRequest), ServiceError> {
    let bytes = req.input.bytes();
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
        .run(move || prepare_generation(&m, &req).map(|p| (p, req)))
        .await?
}

/// What an embedding input longer than the model's context gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncate {
    /// A `PromptTooLong` error (OpenAI's behaviour).
    Refuse,
    /// Its first tokens, up to the context (Ollama's default).
    Keep,
}

/// What a generation gives its front door, in order: deltas, then the calls (only for requests with
/// tools, whose answer is read whole), then the end.
#[derive(Debug)]
pub enum Event {
    /// Text (and its tokens' log-probabilities, when asked for).
    Delta(Delta),
    /// The model called tools.
    ToolCalls(Vec<ToolCall>),
    /// The end, with statistics.
    Done(GenStats),
}

/// How a finished generation ended, for a front door's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A natural end (end of sequence, a stop sequence, a complete grammar).
    Stop,
    /// `max_tokens` or the context ran out.
    Length,
    /// The model called tools.
    ToolCalls,
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
    metrics: Arc<Metrics>,
    /// Set once the outcome is counted.
    counted: bool,
    /// Tools: the answer is held until it ends, then read for calls.
    tools: Option<ToolReading>,
    held: Delta,
    /// The end, once the calls it follows are given.
    after_calls: Option<GenStats>,
    tool_calls: bool,
    /// Held, never read: dropping it tells the state owner the request is done.
    #[allow(dead_code)]
    grant: Grant,
    /// Held, never read: dropping it frees the client's slot.
    #[allow(dead_code)]
    slot: ClientSlot,
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.counted {
            self.metrics.request(&self.model, "generate", "cancelled");
        }
    }
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

    /// How the generation ended, given its statistics.
    pub fn ending(&self, s: &GenStats) -> Ending {
        use crate::worker::FinishReason as F;
        if self.tool_calls {
            return Ending::ToolCalls;
        }
        match s.finish {
            F::Eos | F::Stop | F::Cancelled => Ending::Stop,
            F::Length | F::Context => Ending::Length,
        }
    }

    /// The front door stopped the stream because its client did not read: counted as stalled.
    pub fn stalled(&mut self) {
        self.count("stalled");
    }

    fn count(&mut self, outcome: &str) {
        if !self.counted {
            self.counted = true;
            self.metrics.request(&self.model, "generate", outcome);
        }
    }

    /// The next event (None once it has ended). A failure of the model, or the daemon's shutdown grace
    /// period running out, is an error; either way its outcome is counted.
    pub async fn next(&mut self) -> Result<Option<Event>, ServiceError> {
        if let Some(s) = self.after_calls.take() {
            return Ok(Some(Event::Done(s)));
        }
        loop {
            let event = match self.recv().await {
                Ok(e) => e,
                Err(e) => {
                    self.count("shutdown");
                    return Err(e);
                }
            };
            match event {
                None => {
                    if self.counted {
                        return Ok(None);
                    }
                    let e = ServiceError::Engine(EngineError::WorkerGone);
                    self.count(outcome_of(&Err(&e)));
                    return Err(e);
                }
                Some(GenEvent::Delta(d)) => {
                    self.backlog.taken();
                    if self.tools.is_none() {
                        return Ok(Some(Event::Delta(d)));
                    }
                    self.held.text.push_str(&d.text);
                    self.held.logprobs.extend(d.logprobs);
                }
                Some(GenEvent::Failed(e)) => {
                    let e = ServiceError::Engine(e);
                    self.count(outcome_of(&Err(&e)));
                    return Err(e);
                }
                Some(GenEvent::Done(s)) => {
                    self.count("ok");
                    self.metrics.generated(
                        &self.model,
                        s.prompt_tokens as u64,
                        s.completion_tokens as u64,
                        s.ttft_ms,
                    );
                    let Some(reading) = self.tools else {
                        return Ok(Some(Event::Done(s)));
                    };
                    let held = std::mem::take(&mut self.held);
                    let prefix = fresh_id("call");
                    let mut parsed = crate::tools::parse(reading.dialect, &held.text, |i| {
                        format!("{prefix}_{i}")
                    });
                    if !reading.parallel {
                        parsed.calls.truncate(1);
                    }
                    self.tools = None;
                    if parsed.calls.is_empty() {
                        self.after_calls = Some(s);
                        return Ok(Some(Event::Delta(Delta {
                            text: parsed.content,
                            logprobs: held.logprobs,
                        })));
                    }
                    self.tool_calls = true;
                    self.after_calls = Some(s);
                    return Ok(Some(Event::ToolCalls(parsed.calls)));
                }
            }
        }
    }

    async fn recv(&mut self) -> Result<Option<GenEvent>, ServiceError> {
        let ended = ServiceError::EndedByShutdown {
            grace_ms: self.grace_ms,
        };
        if *self.end.borrow() {
            return Err(ended);
        }
        Ok(tokio::select! {
            event = self.events.recv() => event,
            changed = self.end.changed() => match changed {
                Ok(()) if *self.end.borrow() => return Err(ended),
                _ => self.events.recv().await,
            },
        })
    }
}

/// A fresh id for a response or a tool call: `prefix-` and 16 hex digits from the OS-seeded hasher and
/// the clock.
pub fn fresh_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{prefix}-{:016x}", h.finish())
}

/// A whole answer, for a front door that does not stream.
#[derive(Debug)]
pub struct Answer {
    /// The text.
    pub text: String,
    /// Its tokens' log-probabilities, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// The calls, for requests with tools.
    pub calls: Vec<ToolCall>,
    /// The statistics.
    pub stats: GenStats,
    /// How it ended.
    pub ending: Ending,
    /// Set when this request caused the model's load.
    pub load_ms: Option<u64>,
}

impl Generation {
    /// Runs the generation to its end and returns the whole answer.
    pub async fn gather(mut self) -> Result<Answer, ServiceError> {
        let (mut text, mut logprobs, mut calls) = (String::new(), Vec::new(), Vec::new());
        loop {
            match self.next().await? {
                None => return Err(ServiceError::Engine(EngineError::WorkerGone)),
                Some(Event::Delta(d)) => {
                    text.push_str(&d.text);
                    logprobs.extend(d.logprobs);
                }
                Some(Event::ToolCalls(c)) => calls = c,
                Some(Event::Done(stats)) => {
                    return Ok(Answer {
                        ending: self.ending(&stats),
                        load_ms: self.load_ms,
                        text,
                        logprobs,
                        calls,
                        stats,
                    });
                }
            }
        }
    }
}

/// Streams `g` into `tx` for a front door: `map` turns each event (or the error that ends it) into the
/// front's message and says whether it is the last. The stream stops when the client goes away or stops
/// reading for `[daemon] write_timeout` (the generation is then dropped, which cancels it).
pub async fn pump<T: Send + 'static>(
    mut g: Generation,
    tx: mpsc::Sender<T>,
    write_timeout: std::time::Duration,
    mut map: impl FnMut(&Generation, Result<Event, ServiceError>) -> Vec<T> + Send,
) {
    loop {
        tokio::select! {
            event = g.next() => {
                let (msgs, last) = match event {
                    Ok(Some(e)) => {
                        let last = matches!(e, Event::Done(_));
                        (map(&g, Ok(e)), last)
                    }
                    Ok(None) => return,
                    Err(e) => (map(&g, Err(e)), true),
                };
                for msg in msgs {
                    match tx.send_timeout(msg, write_timeout).await {
                        Ok(()) => {}
                        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                            tracing::info!(model = g.model(), timeout_ms = write_timeout.as_millis() as u64, "stream cancelled: the client did not read");
                            g.stalled();
                            return;
                        }
                        Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
                    }
                }
                if last {
                    return;
                }
            }
            // The client went away: dropping the generation cancels the job at its next decode step.
            () = tx.closed() => return,
        }
    }
}

/// The request core: what every front door calls.
#[derive(Debug, Clone)]
pub struct Core {
    handle: Handle,
    metrics: Arc<Metrics>,
}

impl Core {
    /// A core over the state owner behind `handle`, counting into `metrics`.
    pub fn new(handle: Handle, metrics: Arc<Metrics>) -> Self {
        Self { handle, metrics }
    }

    /// The state owner.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Validates `req` against its model, takes a slot of `client`'s, waits for admission and starts
    /// generating. A refusal is counted here.
    pub async fn generate(
        &self,
        client: &str,
        req: GenerateRequest,
    ) -> Result<Generation, ServiceError> {
        let model = req.model.clone();
        let started = self.start(client, req).await;
        if let Err(e) = &started {
            self.metrics
                .request(&model, "generate", outcome_of(&Err(e)));
        }
        started
    }

    async fn start(&self, client: &str, req: GenerateRequest) -> Result<Generation, ServiceError> {
        let handle = &self.handle;
        let submitted = Instant::now();
        let slot = handle.limits().acquire(client)?;
        let m = handle.resolve(&req.model).await?;
        let (params, req) = prepare(handle, &m, req).await?;
        let mut grant = handle.acquire(&m.config.name, RequestKind::Use).await?;
        if req.keep_alive.is_some() {
            grant.keep_alive_after(req.keep_alive);
        }
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
            sampling: req.sampling,
            stop: req.stop,
            ignore_eos: req.at_eos == AtEos::Continue,
            logprobs: req.logprobs,
            constraint: params.constraint,
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
            metrics: self.metrics.clone(),
            counted: false,
            tools: params.tools,
            held: Delta::default(),
            after_calls: None,
            tool_calls: false,
            grant,
            slot,
        })
    }

    /// Embeds `inputs` with the embedding model behind `model`, holding a slot of `client`'s; the outcome
    /// is counted here.
    pub async fn embed(
        &self,
        client: &str,
        model: &str,
        inputs: &[String],
        truncate: Truncate,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Embedded, ServiceError> {
        let result = embed(&self.handle, client, model, inputs, truncate, keep_alive).await;
        match &result {
            Ok(e) => {
                self.metrics.request(&e.model, "embed", "ok");
                self.metrics.embedded(&e.model, e.prompt_tokens as u64);
            }
            Err(err) => self.metrics.request(model, "embed", outcome_of(&Err(err))),
        }
        result
    }
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
async fn embed(
    handle: &Handle,
    client: &str,
    name: &str,
    inputs: &[String],
    truncate: Truncate,
    keep_alive: Option<KeepAlive>,
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
        if truncate == Truncate::Refuse {
            insp.tokenizer
                .fits_by_length(text.len(), limit)
                .map_err(|e| too_long(text.len(), e.at_least))?;
        }
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
                .map(|t| match truncate {
                    Truncate::Refuse => tokenizer_of
                        .tokenizer
                        .encode_limited(t, true, limit)
                        .map_err(|e| (t.len(), e.at_least)),
                    Truncate::Keep => Ok(tokenizer_of.tokenizer.encode_truncated(t, true, limit)),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    let tokenized = encoded.map_err(|(bytes, at_least)| too_long(bytes, at_least))?;
    let prompt_tokens = tokenized.iter().map(Vec::len).sum();
    let mut grant = handle.acquire(&m.config.name, RequestKind::Use).await?;
    if keep_alive.is_some() {
        grant.keep_alive_after(keep_alive);
    }
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
