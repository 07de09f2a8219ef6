//! OpenAI's chat and completions requests, translated into the request core's [`GenerateRequest`] and
//! its events back into OpenAI's responses and server-sent chunks: `response_format` (JSON object or
//! schema, by grammar), `tools`/`tool_choice` (calls parsed into `tool_calls`, streamed as one delta each),
//! `logprobs`/`top_logprobs`, `n` choices. A parameter ult does not implement is refused with a 400 that
//! names it; the hints OpenAI documents as ignorable are accepted (listed in README).

use std::convert::Infallible;

use axum::Json;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::generation::{AtEos, Ending, Event, GenerateRequest, Generation, Input, fresh_id, pump};
use crate::http::{ApiError, HttpState, unix_s};
use crate::tools::{ToolCall, ToolChoice, ToolDef, Tools};
use crate::worker::GenStats;
use ult_engine::constraint::OutputFormat;
use ult_engine::sampler::SamplingParams;
use ult_engine::sequence::TokenLogprob;
use ult_engine::template::ChatMessage;

/// The most choices one request may ask for.
pub const MAX_CHOICES: u32 = 8;

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    fn list(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Message content: a string, or a list of parts of which text parts are used.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

impl Content {
    fn text(self) -> Result<String, ApiError> {
        match self {
            Self::Text(t) => Ok(t),
            Self::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (p["type"].as_str(), p["text"].as_str()) {
                        (Some("text"), Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::bad_request(
                                "messages",
                                format!(
                                    "content parts of type {} are not supported: ult's models read text only",
                                    kind.unwrap_or("(none)")
                                ),
                            ));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct FunctionCallIn {
    name: String,
    /// A JSON string, as OpenAI sends it.
    arguments: Value,
}

#[derive(Debug, Deserialize)]
struct ToolCallIn {
    id: Option<String>,
    function: FunctionCallIn,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
    tool_calls: Option<Vec<ToolCallIn>>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

/// Turns OpenAI's messages into ult's: assistant tool calls with their arguments parsed (templates want
/// objects, OpenAI sends strings), tool results with their call ids.
fn messages_from(ms: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::with_capacity(ms.len());
    for m in ms {
        let content = match m.content {
            Some(c) => c.text()?,
            None => String::new(),
        };
        let tool_calls = match m.tool_calls {
            None => None,
            Some(calls) => {
                let mut v = Vec::with_capacity(calls.len());
                for c in calls {
                    let arguments = match c.function.arguments {
                        Value::String(s) => serde_json::from_str(&s).map_err(|e| {
                            ApiError::bad_request(
                                "messages",
                                format!("a tool call's arguments are not JSON: {e}"),
                            )
                        })?,
                        other => other,
                    };
                    v.push(json!({ "id": c.id, "type": "function",
                        "function": { "name": c.function.name, "arguments": arguments } }));
                }
                Some(Value::Array(v))
            }
        };
        out.push(ChatMessage {
            role: m.role,
            content,
            tool_calls,
            tool_call_id: m.tool_call_id,
            name: m.name,
        });
    }
    Ok(out)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct JsonSchemaFormat {
    schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
struct FunctionDef {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ToolIn {
    #[serde(rename = "type")]
    kind: String,
    function: FunctionDef,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ToolChoiceIn {
    Mode(String),
    Named { function: NamedFunction },
}

#[derive(Debug, Deserialize)]
struct NamedFunction {
    name: String,
}

/// Every parameter of the chat and completions endpoints that ult reads or knowingly ignores; anything
/// else is refused by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    response_format: Option<ResponseFormat>,
    tools: Option<Vec<ToolIn>>,
    tool_choice: Option<ToolChoiceIn>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    modalities: Option<Vec<String>>,
    // Extensions llama.cpp's server and vLLM accept too.
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
    cache_prompt: Option<bool>,
    // Hints OpenAI documents as optional; accepted and ignored (README lists them).
    #[serde(rename = "user")]
    _user: Option<Value>,
    #[serde(rename = "store")]
    _store: Option<Value>,
    #[serde(rename = "metadata")]
    _metadata: Option<Value>,
    #[serde(rename = "service_tier")]
    _service_tier: Option<Value>,
    parallel_tool_calls: Option<bool>,
    #[serde(rename = "prediction")]
    _prediction: Option<Value>,
    #[serde(rename = "safety_identifier")]
    _safety_identifier: Option<Value>,
    #[serde(rename = "prompt_cache_key")]
    _prompt_cache_key: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    model: String,
    prompt: Prompt,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
    best_of: Option<u32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
    cache_prompt: Option<bool>,
    #[serde(rename = "user")]
    _user: Option<Value>,
}

/// The sampling fields of either endpoint's request (the two types list them apart, as
/// `deny_unknown_fields` cannot see through `flatten`).
macro_rules! common_of {
    ($req:expr) => {
        Common {
            temperature: $req.temperature,
            top_p: $req.top_p,
            seed: $req.seed,
            top_k: $req.top_k,
            repetition_penalty: $req.repetition_penalty,
            frequency_penalty: $req.frequency_penalty,
            presence_penalty: $req.presence_penalty,
            logit_bias: $req.logit_bias,
            n: $req.n,
        }
    };
}

/// The sampling fields shared by both endpoints.
struct Common {
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    n: Option<u32>,
}

impl Common {
    /// OpenAI's defaults: temperature 1 and top_p 1 when unset. Penalties ult does not implement are
    /// refused unless they are 0 (their "off").
    fn sampling(&self) -> Result<(SamplingParams, u32), ApiError> {
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad_request(
                    name,
                    format!("{name} is not supported; use repetition_penalty"),
                ));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::bad_request(
                "logit_bias",
                "logit_bias is not supported",
            ));
        }
        let n = self.n.unwrap_or(1);
        if n == 0 || n > MAX_CHOICES {
            return Err(ApiError::bad_request(
                "n",
                format!("n must be 1 to {MAX_CHOICES}"),
            ));
        }
        Ok((
            SamplingParams {
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
                repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
                ..SamplingParams::default()
            },
            n,
        ))
    }
}

fn tools_from(
    tools: Option<Vec<ToolIn>>,
    choice: Option<ToolChoiceIn>,
) -> Result<Option<Tools>, ApiError> {
    let choice = match choice {
        None => None,
        Some(ToolChoiceIn::Mode(m)) => Some(match m.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::bad_request(
                    "tool_choice",
                    format!(
                        "unknown tool_choice {other:?}; use auto, none, required or a function"
                    ),
                ));
            }
        }),
        Some(ToolChoiceIn::Named { function }) => Some(ToolChoice::Named(function.name)),
    };
    let Some(tools) = tools else {
        return match choice {
            None | Some(ToolChoice::None) | Some(ToolChoice::Auto) => Ok(None),
            Some(_) => Err(ApiError::bad_request(
                "tool_choice",
                "tool_choice asks for a call but the request has no tools",
            )),
        };
    };
    let mut defs = Vec::with_capacity(tools.len());
    for t in tools {
        if t.kind != "function" {
            return Err(ApiError::bad_request(
                "tools",
                format!("tools of type {:?} are not supported; use function", t.kind),
            ));
        }
        defs.push(ToolDef::new(
            t.function.name,
            t.function.description,
            t.function.parameters,
        ));
    }
    Ok(Some(Tools {
        defs,
        choice: choice.unwrap_or(ToolChoice::Auto),
        parallel: true,
    }))
}

/// Which response shape a generation streams or returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Chat,
    Completion,
}

fn finish_reason(e: Ending) -> &'static str {
    match e {
        Ending::Stop => "stop",
        Ending::Length => "length",
        Ending::ToolCalls => "tool_calls",
    }
}

/// Token counts.
#[derive(Debug, Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
    prompt_tokens_details: CachedTokens,
}

#[derive(Debug, Serialize)]
struct CachedTokens {
    cached_tokens: usize,
}

impl Usage {
    /// The choices of one request share its prompt.
    fn of(stats: &[GenStats]) -> Self {
        let prompt = stats.first().map_or(0, |s| s.prompt_tokens);
        let completion: usize = stats.iter().map(|s| s.completion_tokens).sum();
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: CachedTokens {
                cached_tokens: stats.first().map_or(0, |s| s.cached_tokens),
            },
        }
    }
}

/// One token's log-probability as OpenAI (and Ollama) write it.
#[derive(Debug, Serialize)]
pub struct LogprobOut {
    token: String,
    logprob: f32,
    bytes: Vec<u8>,
    top_logprobs: Vec<TopLogprobOut>,
}

/// An alternative at one position.
#[derive(Debug, Serialize)]
pub struct TopLogprobOut {
    token: String,
    logprob: f32,
    bytes: Vec<u8>,
}

impl LogprobOut {
    /// The wire form of the engine's log-probabilities.
    pub fn list(lps: &[TokenLogprob]) -> Vec<Self> {
        lps.iter()
            .map(|t| Self {
                token: String::from_utf8_lossy(&t.bytes).into_owned(),
                logprob: t.logprob,
                bytes: t.bytes.clone(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(_, b, lp)| TopLogprobOut {
                        token: String::from_utf8_lossy(b).into_owned(),
                        logprob: *lp,
                        bytes: b.clone(),
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Chat's `logprobs`.
#[derive(Debug, Serialize)]
struct ChatLogprobs {
    content: Vec<LogprobOut>,
}

/// The completions endpoint's (legacy) `logprobs`.
#[derive(Debug, Serialize)]
struct LegacyLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<serde_json::Map<String, Value>>,
    text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    fn of(lps: &[TokenLogprob], offset: &mut usize) -> Self {
        let mut out = Self {
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
        };
        for t in lps {
            out.text_offset.push(*offset);
            *offset += t.bytes.len();
            out.tokens
                .push(String::from_utf8_lossy(&t.bytes).into_owned());
            out.token_logprobs.push(t.logprob);
            let mut m = serde_json::Map::new();
            for (_, b, lp) in &t.top {
                m.insert(String::from_utf8_lossy(b).into_owned(), json!(lp));
            }
            out.top_logprobs.push(m);
        }
        out
    }
}

#[derive(Debug, Serialize)]
struct FunctionOut {
    name: String,
    /// A JSON string, as OpenAI sends it.
    arguments: String,
}

#[derive(Debug, Serialize)]
struct ToolCallOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionOut,
}

impl ToolCallOut {
    /// Calls as a message carries them (`index` only in stream deltas).
    fn list(calls: &[ToolCall], streamed: bool) -> Vec<Self> {
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| Self {
                index: streamed.then_some(i),
                id: c.id.clone(),
                kind: "function",
                function: FunctionOut {
                    name: c.name.clone(),
                    arguments: c.arguments.to_string(),
                },
            })
            .collect()
    }
}

#[derive(Debug, Serialize)]
struct AssistantMessage {
    role: &'static str,
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallOut>>,
}

#[derive(Debug, Serialize, Default)]
struct DeltaOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallOut>>,
}

/// One choice, in whichever of the four shapes (chat or completion, whole or a stream chunk).
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ChoiceOut {
    Chat {
        index: usize,
        message: AssistantMessage,
        finish_reason: &'static str,
        logprobs: Option<ChatLogprobs>,
    },
    ChatDelta {
        index: usize,
        delta: DeltaOut,
        finish_reason: Option<&'static str>,
        logprobs: Option<ChatLogprobs>,
    },
    Text {
        index: usize,
        text: String,
        finish_reason: Option<&'static str>,
        logprobs: Option<LegacyLogprobs>,
    },
}

/// A whole response or one stream chunk.
#[derive(Debug, Serialize)]
struct CompletionOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChoiceOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
}

/// Starts `n` generations of `req` (seeds `seed`, `seed + 1`, … when one is given, so the choices differ).
async fn start_all(
    state: &HttpState,
    client: &str,
    req: GenerateRequest,
    n: u32,
) -> Result<Vec<Generation>, ApiError> {
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut r = req.clone();
        r.sampling.seed = req.sampling.seed.map(|s| s.wrapping_add(u64::from(i)));
        out.push(state.core.generate(client, r).await?);
    }
    Ok(out)
}

struct Reply {
    shape: Shape,
    n: u32,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

async fn respond(
    state: HttpState,
    client: String,
    req: GenerateRequest,
    reply: Reply,
) -> Result<Response, ApiError> {
    let gens = start_all(&state, &client, req, reply.n).await?;
    let id = fresh_id(if reply.shape == Shape::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = unix_s();
    let served = gens
        .first()
        .map(|g| g.model().to_string())
        .unwrap_or_default();
    let fingerprint = format!("ult-{}", env!("CARGO_PKG_VERSION"));
    let want_logprobs = reply.logprobs;
    if !reply.stream {
        let results = futures::future::join_all(gens.into_iter().map(Generation::gather)).await;
        let mut choices = Vec::new();
        let mut stats = Vec::new();
        for (index, r) in results.into_iter().enumerate() {
            let r = r?;
            let finish_reason = finish_reason(r.ending);
            choices.push(match reply.shape {
                Shape::Chat => ChoiceOut::Chat {
                    index,
                    message: AssistantMessage {
                        role: "assistant",
                        tool_calls: (!r.calls.is_empty())
                            .then(|| ToolCallOut::list(&r.calls, false)),
                        content: r.calls.is_empty().then_some(r.text),
                    },
                    finish_reason,
                    logprobs: want_logprobs.then(|| ChatLogprobs {
                        content: LogprobOut::list(&r.logprobs),
                    }),
                },
                Shape::Completion => ChoiceOut::Text {
                    index,
                    text: r.text,
                    finish_reason: Some(finish_reason),
                    logprobs: want_logprobs.then(|| LegacyLogprobs::of(&r.logprobs, &mut 0)),
                },
            });
            stats.push(r.stats);
        }
        let body = CompletionOut {
            id: &id,
            object: if reply.shape == Shape::Chat {
                "chat.completion"
            } else {
                "text_completion"
            },
            created,
            model: &served,
            choices,
            usage: Some(Usage::of(&stats)),
            system_fingerprint: Some(&fingerprint),
        };
        return Ok(Json(body).into_response());
    }
    // Streaming: each choice's chunks as they come (each names its index), then usage if asked, then
    // [DONE] once every choice has ended.
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let write_timeout = state.core.handle().write_timeout();
    let shape = reply.shape;
    let object = if shape == Shape::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let (stats_tx, mut stats_rx) = mpsc::unbounded_channel::<GenStats>();
    let pumps: Vec<_> = gens
        .into_iter()
        .enumerate()
        .map(|(index, g)| {
            let (id, served, tx, stats_tx) =
                (id.clone(), served.clone(), tx.clone(), stats_tx.clone());
            let mut offset = 0usize;
            let mut first = shape == Shape::Chat;
            pump(g, tx, write_timeout, move |g, event| {
                let chunk = |choice: ChoiceOut| -> Result<SseEvent, Infallible> {
                    let c = CompletionOut {
                        id: &id,
                        object,
                        created,
                        model: &served,
                        choices: vec![choice],
                        usage: None,
                        system_fingerprint: None,
                    };
                    Ok(SseEvent::default().data(serde_json::to_string(&c).unwrap_or_default()))
                };
                let delta = |delta: DeltaOut, finish_reason, logprobs| ChoiceOut::ChatDelta {
                    index,
                    delta,
                    finish_reason,
                    logprobs,
                };
                let mut out = Vec::new();
                if std::mem::take(&mut first) {
                    let opener = DeltaOut {
                        role: Some("assistant"),
                        content: Some(String::new()),
                        tool_calls: None,
                    };
                    out.push(chunk(delta(opener, None, None)));
                }
                match event {
                    Ok(Event::Delta(d)) => out.push(chunk(match shape {
                        Shape::Chat => delta(
                            DeltaOut {
                                content: Some(d.text),
                                ..DeltaOut::default()
                            },
                            None,
                            want_logprobs.then(|| ChatLogprobs {
                                content: LogprobOut::list(&d.logprobs),
                            }),
                        ),
                        Shape::Completion => ChoiceOut::Text {
                            index,
                            text: d.text,
                            finish_reason: None,
                            logprobs: want_logprobs
                                .then(|| LegacyLogprobs::of(&d.logprobs, &mut offset)),
                        },
                    })),
                    Ok(Event::ToolCalls(calls)) => out.push(chunk(delta(
                        DeltaOut {
                            tool_calls: Some(ToolCallOut::list(&calls, true)),
                            ..DeltaOut::default()
                        },
                        None,
                        None,
                    ))),
                    Ok(Event::Done(s)) => {
                        let ending = Some(finish_reason(g.ending(&s)));
                        out.push(chunk(match shape {
                            Shape::Chat => delta(DeltaOut::default(), ending, None),
                            Shape::Completion => ChoiceOut::Text {
                                index,
                                text: String::new(),
                                finish_reason: ending,
                                logprobs: None,
                            },
                        }));
                        let _ = stats_tx.send(s);
                    }
                    Err(e) => {
                        let e = ApiError::from(e);
                        out.push(Ok(SseEvent::default().data(e.body().to_string())));
                    }
                }
                out
            })
        })
        .collect();
    drop(stats_tx);
    let include_usage = reply.include_usage;
    tokio::spawn(async move {
        futures::future::join_all(pumps).await;
        if tx.is_closed() {
            return;
        }
        let mut stats = Vec::new();
        while let Ok(s) = stats_rx.try_recv() {
            stats.push(s);
        }
        if include_usage {
            let last = CompletionOut {
                id: &id,
                object,
                created,
                model: &served,
                choices: Vec::new(),
                usage: Some(Usage::of(&stats)),
                system_fingerprint: None,
            };
            let data = serde_json::to_string(&last).unwrap_or_default();
            let _ = tx.send(Ok(SseEvent::default().data(data))).await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Ok(Sse::new(ReceiverStream::new(rx)).into_response())
}

/// `POST /v1/chat/completions`.
pub async fn chat(state: HttpState, client: String, req: Value) -> Result<Response, ApiError> {
    let req: ChatRequest = crate::http::parse_body(req)?;
    cache_prompt(req.cache_prompt)?;
    let (sampling, n) = common_of!(req).sampling()?;
    if let Some(m) = req
        .modalities
        .as_ref()
        .filter(|m| m.iter().any(|x| x != "text"))
    {
        return Err(ApiError::bad_request(
            "modalities",
            format!("only text output is supported, not {m:?}"),
        ));
    }
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), top) => Some(top.unwrap_or(0) as usize),
        (_, Some(t)) if t > 0 => {
            return Err(ApiError::bad_request(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        _ => None,
    };
    let format = match req.response_format {
        None | Some(ResponseFormat::Text) => OutputFormat::Text,
        Some(ResponseFormat::JsonObject) => OutputFormat::JsonObject,
        Some(ResponseFormat::JsonSchema { json_schema }) => match json_schema.schema {
            Some(s) => OutputFormat::JsonSchema(s),
            None => OutputFormat::JsonObject,
        },
    };
    let tools = tools_from(req.tools, req.tool_choice)?.map(|mut t| {
        t.parallel = req.parallel_tool_calls.unwrap_or(true);
        t
    });
    let messages = messages_from(req.messages)?;
    let request = GenerateRequest {
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        sampling,
        stop: req.stop.map(Stop::list).unwrap_or_default(),
        at_eos: if req.ignore_eos {
            AtEos::Continue
        } else {
            AtEos::Stop
        },
        format,
        logprobs,
        tools,
        ..GenerateRequest::new(req.model, Input::Messages(messages))
    };
    let reply = Reply {
        shape: Shape::Chat,
        n,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        logprobs: logprobs.is_some(),
    };
    respond(state, client, request, reply).await
}

/// llama.cpp's `cache_prompt`: `true` (its default) is what ult does anyway; `false` is refused, since ult's
/// prefix cache is set per model (`prefix_cache` in models.toml), not per request.
fn cache_prompt(v: Option<bool>) -> Result<(), ApiError> {
    if v == Some(false) {
        return Err(ApiError::bad_request(
            "cache_prompt",
            "cache_prompt = false is not supported: ult's prefix cache is set per model (prefix_cache in models.toml)",
        ));
    }
    Ok(())
}

/// `POST /v1/completions`.
pub async fn completions(
    state: HttpState,
    client: String,
    req: Value,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = crate::http::parse_body(req)?;
    cache_prompt(req.cache_prompt)?;
    if req.echo {
        return Err(ApiError::bad_request("echo", "echo is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix", "suffix is not supported"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::bad_request(
            "best_of",
            "only best_of = 1 is supported",
        ));
    }
    let (sampling, n) = common_of!(req).sampling()?;
    let prompt = match req.prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::bad_request(
                "prompt",
                "send one prompt per request",
            ));
        }
    };
    let logprobs = req.logprobs.map(|n| n as usize);
    let request = GenerateRequest {
        // OpenAI's completions default is 16 tokens.
        max_tokens: Some(req.max_tokens.unwrap_or(16)),
        sampling,
        stop: req.stop.map(Stop::list).unwrap_or_default(),
        at_eos: if req.ignore_eos {
            AtEos::Continue
        } else {
            AtEos::Stop
        },
        logprobs,
        ..GenerateRequest::new(req.model, Input::Prompt(prompt))
    };
    let reply = Reply {
        shape: Shape::Completion,
        n,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        logprobs: logprobs.is_some(),
    };
    respond(state, client, request, reply).await
}
