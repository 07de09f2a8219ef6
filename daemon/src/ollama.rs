//! Ollama's native API on its own listener (by default Ollama's own address, 127.0.0.1:11434, so apps
//! written for Ollama work unchanged): `/api/generate` and `/api/chat` (NDJSON streams or one JSON),
//! `/api/embed`, `/api/embeddings`, `/api/tags`, `/api/ps`, `/api/show`, `/api/version`, `GET`/`HEAD /`.
//! Requests translate into the request core's [`GenerateRequest`]; what ult cannot honour gets a clear
//! `{"error": …}` naming it, never a silently different answer.
//!
//! Choices (README lists them): requests without `options` get Ollama's own sampling defaults
//! (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1 over 64 tokens) and without `keep_alive`
//! Ollama's 5 minutes; `num_ctx` may narrow a request's window but not widen the configured context; the
//! load-time options (`num_gpu`, `num_thread`, `use_mmap`, …) are accepted and ignored, as ult's config
//! governs them; unknown options are refused by name. Models are served under their ult names; a
//! `:latest` tag is accepted.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use ult_policy::{KeepAlive, RequestKind, Residency};

use crate::error::ServiceError;
use crate::generation::{Ending, Event, GenerateRequest, Input, Truncate, pump};
use crate::http::{HttpState, unknown_field};
use crate::limits::client_key;
use crate::openai::LogprobOut;
use crate::tools::{ToolCall, ToolChoice, ToolDef, Tools};
use crate::worker::GenStats;
use ult_engine::ModelKind;
use ult_engine::constraint::OutputFormat;
use ult_engine::sampler::SamplingParams;
use ult_engine::template::ChatMessage;

/// The Ollama API version ult implements (clients gate features on it).
pub const API_VERSION: &str = "0.12.6";

/// Ollama's keep-alive when a request names none.
pub const DEFAULT_KEEP_ALIVE: KeepAlive = KeepAlive::Millis(5 * 60 * 1000);

/// Ollama's routes, with a request body limit of `max_body` bytes.
pub fn router(state: HttpState, max_body: usize) -> Router {
    let routes = Router::new()
        .route("/api/generate", post(generate))
        .route("/api/chat", post(chat))
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/version", get(version))
        .route("/api/pull", post(unsupported))
        .route("/api/push", post(unsupported))
        .route("/api/create", post(unsupported))
        .route("/api/copy", post(unsupported))
        .route(
            "/api/delete",
            axum::routing::delete(unsupported).post(unsupported),
        )
        .route("/api/blobs/{digest}", post(unsupported).head(unsupported));
    let check = crate::http::BearerCheck {
        state: state.clone(),
        front: "ollama",
        refuse: || {
            OllamaError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
                .into_response()
        },
    };
    crate::http::with_bearer(routes, check)
        .route("/", get(|| async { "Ollama is running" }).head(|| async {}))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// An error as Ollama writes it: `{"error": "…"}`.
#[derive(Debug)]
pub struct OllamaError {
    status: StatusCode,
    message: String,
    retry_after_s: Option<u64>,
}

impl OllamaError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after_s: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<ServiceError> for OllamaError {
    fn from(e: ServiceError) -> Self {
        // The same statuses as the OpenAI front; only the body's shape differs.
        let api = crate::http::ApiError::from(e);
        Self {
            status: api.status(),
            message: api.message().to_string(),
            retry_after_s: api.retry_after_s(),
        }
    }
}

/// The body as JSON, whatever its content type (Ollama's own server and its documentation's `curl`
/// examples send none).
fn json_body(body: Result<axum::body::Bytes, BytesRejection>) -> Result<Value, OllamaError> {
    let bytes = body.map_err(|r| OllamaError::new(StatusCode::PAYLOAD_TOO_LARGE, r.body_text()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| OllamaError::bad(format!("the body is not JSON: {e}")))
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
        }
        let mut r = (
            self.status,
            Json(Body {
                error: self.message,
            }),
        )
            .into_response();
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

async fn unsupported(uri: axum::http::Uri) -> OllamaError {
    OllamaError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "{} is not supported by ult: ult serves the models in its models.toml; add the model there (a GGUF file or a safetensors directory) and restart or reload ultd",
            uri.path()
        ),
    )
}

/// `2026-12-01T19:55:06.123456789Z` for a time since the epoch.
fn rfc3339(t: Duration) -> String {
    let secs = t.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        t.subsec_nanos()
    )
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// `keep_alive`: a number of seconds or a Go duration ("5m", "1h30m", "-1"); negative keeps forever.
fn keep_alive_from(v: &Option<Value>) -> Result<KeepAlive, OllamaError> {
    let bad = |s: &str| {
        OllamaError::bad(format!(
            "keep_alive {s:?} is not a duration: use seconds or a duration like \"5m\", \"1h30m\", 0 or -1"
        ))
    };
    let text = match v {
        None | Some(Value::Null) => return Ok(DEFAULT_KEEP_ALIVE),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(other) => return Err(bad(&other.to_string())),
    };
    if let Some(magnitude) = text.strip_prefix('-') {
        // Any negative duration keeps the model loaded, as in Ollama.
        return ult_policy::parse_duration_ms(magnitude)
            .map(|_| KeepAlive::Forever)
            .map_err(|_| bad(&text));
    }
    ult_policy::parse_duration_ms(&text)
        .map(KeepAlive::Millis)
        .map_err(|_| bad(&text))
}

/// Ollama's `options`, with Ollama's defaults for what is unset.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Options {
    num_ctx: Option<i64>,
    num_predict: Option<i64>,
    temperature: Option<f32>,
    top_k: Option<i64>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    typical_p: Option<f32>,
    tfs_z: Option<f32>,
    mirostat: Option<i64>,
    // Read only with mirostat, which is refused unless 0.
    #[serde(rename = "mirostat_tau")]
    _mirostat_tau: Option<f32>,
    #[serde(rename = "mirostat_eta")]
    _mirostat_eta: Option<f32>,
    // Load-time and runtime hints ult's config governs: accepted, ignored (README lists them).
    #[serde(rename = "numa")]
    _numa: Option<Value>,
    #[serde(rename = "num_batch")]
    _num_batch: Option<Value>,
    #[serde(rename = "num_gpu")]
    _num_gpu: Option<Value>,
    #[serde(rename = "main_gpu")]
    _main_gpu: Option<Value>,
    #[serde(rename = "low_vram")]
    _low_vram: Option<Value>,
    #[serde(rename = "f16_kv")]
    _f16_kv: Option<Value>,
    #[serde(rename = "logits_all")]
    _logits_all: Option<Value>,
    #[serde(rename = "vocab_only")]
    _vocab_only: Option<Value>,
    #[serde(rename = "use_mmap")]
    _use_mmap: Option<Value>,
    #[serde(rename = "use_mlock")]
    _use_mlock: Option<Value>,
    #[serde(rename = "embedding_only")]
    _embedding_only: Option<Value>,
    #[serde(rename = "num_thread")]
    _num_thread: Option<Value>,
    #[serde(rename = "num_keep")]
    _num_keep: Option<Value>,
    #[serde(rename = "penalize_newline")]
    _penalize_newline: Option<Value>,
}

/// What a request's options turn into.
struct Sampled {
    sampling: SamplingParams,
    max_tokens: Option<u32>,
    stop: Vec<String>,
    window: Option<usize>,
}

fn options_from(v: Option<Value>, context: usize, model: &str) -> Result<Sampled, OllamaError> {
    let o: Options = match v {
        None | Some(Value::Null) => Options::default(),
        Some(v) => serde_json::from_value(v).map_err(|e| match unknown_field(&e) {
            Some(name) => OllamaError::bad(format!("option {name:?} is not supported by ult")),
            None => OllamaError::bad(format!("invalid options: {e}")),
        })?,
    };
    for (name, v, off) in [
        ("presence_penalty", o.presence_penalty, 0.0),
        ("frequency_penalty", o.frequency_penalty, 0.0),
        ("typical_p", o.typical_p, 1.0),
        ("tfs_z", o.tfs_z, 1.0),
    ] {
        if v.is_some_and(|v| v != off) {
            return Err(OllamaError::bad(format!(
                "option {name:?} is not supported by ult (only its neutral value {off})"
            )));
        }
    }
    if o.mirostat.is_some_and(|m| m != 0) {
        return Err(OllamaError::bad(
            "option \"mirostat\" is not supported by ult (only 0)",
        ));
    }
    let window = match o.num_ctx {
        None => None,
        Some(n) if n <= 0 => return Err(OllamaError::bad("num_ctx must be positive")),
        Some(n) if n as u64 > context as u64 => {
            return Err(OllamaError::bad(format!(
                "num_ctx {n} is larger than model {model}'s configured context of {context} tokens; raise `context` for it in models.toml"
            )));
        }
        Some(n) => Some(n as usize),
    };
    let max_tokens = match o.num_predict {
        None | Some(-1) | Some(-2) => None,
        Some(n) if n <= 0 => {
            return Err(OllamaError::bad("num_predict must be positive, -1 or -2"));
        }
        Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX).min(context as u32)),
    };
    let sampling = SamplingParams {
        temperature: o.temperature.unwrap_or(0.8),
        top_k: Some(o.top_k.map_or(40, |k| k.max(0) as usize)),
        top_p: Some(o.top_p.unwrap_or(0.9)),
        min_p: o.min_p,
        repetition_penalty: o.repeat_penalty.unwrap_or(1.1),
        repeat_last_n: match o.repeat_last_n {
            None => 64,
            Some(-1) => context,
            Some(n) => n.max(0) as usize,
        },
        seed: o.seed.filter(|&s| s >= 0).map(|s| s as u64),
    };
    Ok(Sampled {
        sampling,
        max_tokens,
        stop: o.stop.unwrap_or_default(),
        window,
    })
}

fn format_from(v: Option<Value>) -> Result<OutputFormat, OllamaError> {
    match v {
        None | Some(Value::Null) => Ok(OutputFormat::Text),
        Some(Value::String(s)) if s.is_empty() => Ok(OutputFormat::Text),
        Some(Value::String(s)) if s == "json" => Ok(OutputFormat::JsonObject),
        Some(Value::String(s)) => Err(OllamaError::bad(format!(
            "format {s:?} is not supported: use \"json\" or a JSON schema"
        ))),
        Some(schema @ Value::Object(_)) => Ok(OutputFormat::JsonSchema(schema)),
        Some(other) => Err(OllamaError::bad(format!(
            "format {other} is not supported: use \"json\" or a JSON schema"
        ))),
    }
}

/// `think` is answered honestly: none of ult's model families separates thinking from the answer.
fn check_think(think: &Option<Value>, model: &str) -> Result<(), OllamaError> {
    match think {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(_) => Err(OllamaError::bad(format!(
            "\"{model}\" does not support thinking"
        ))),
    }
}

fn check_images(images: &Option<Vec<Value>>, model: &str) -> Result<(), OllamaError> {
    if images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(OllamaError::bad(format!(
            "\"{model}\" does not support images: ult serves text models"
        )));
    }
    Ok(())
}

/// Resolves an Ollama model name: ult's name, or it with a `:latest` tag.
async fn resolve(
    state: &HttpState,
    name: &str,
) -> Result<std::sync::Arc<crate::registry::RegisteredModel>, OllamaError> {
    match state.handle.resolve(name).await {
        Ok(m) => Ok(m),
        Err(e) => match name.strip_suffix(":latest") {
            Some(base) => Ok(state.handle.resolve(base).await?),
            None => Err(e.into()),
        },
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    model: String,
    #[serde(default)]
    prompt: String,
    suffix: Option<String>,
    system: Option<String>,
    template: Option<String>,
    context: Option<Vec<i64>>,
    stream: Option<bool>,
    #[serde(default)]
    raw: bool,
    format: Option<Value>,
    options: Option<Value>,
    keep_alive: Option<Value>,
    images: Option<Vec<Value>>,
    think: Option<Value>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct FunctionIn {
    name: String,
    arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ToolCallIn {
    function: FunctionIn,
}

#[derive(Debug, Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: String,
    images: Option<Vec<Value>>,
    tool_calls: Option<Vec<ToolCallIn>>,
    tool_name: Option<String>,
    #[serde(rename = "thinking")]
    _thinking: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct FunctionDefIn {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ToolIn {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    function: FunctionDefIn,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatBody {
    model: String,
    #[serde(default)]
    messages: Vec<MessageIn>,
    tools: Option<Vec<ToolIn>>,
    stream: Option<bool>,
    format: Option<Value>,
    options: Option<Value>,
    keep_alive: Option<Value>,
    think: Option<Value>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, OllamaError> {
    serde_json::from_value(v).map_err(|e| match unknown_field(&e) {
        Some(name) => OllamaError::bad(format!("field {name:?} is not supported by ult")),
        None => OllamaError::bad(format!("invalid request: {e}")),
    })
}

/// A generation's statistics as Ollama writes them, in nanoseconds.
#[derive(Debug, Serialize)]
struct Durations {
    done_reason: &'static str,
    total_duration: u64,
    load_duration: u64,
    prompt_eval_count: usize,
    prompt_eval_duration: u64,
    eval_count: usize,
    eval_duration: u64,
}

impl Durations {
    fn of(s: &GenStats, ending: Ending, load_ms: Option<u64>) -> Self {
        let ns = |ms: f64| (ms * 1e6) as u64;
        Self {
            done_reason: match ending {
                Ending::Stop | Ending::ToolCalls => "stop",
                Ending::Length => "length",
            },
            total_duration: ns(s.total_ms),
            load_duration: load_ms.map_or(0, |ms| ms * 1_000_000),
            prompt_eval_count: s.prompt_tokens,
            prompt_eval_duration: ns(s.prefill_ms),
            eval_count: s.completion_tokens,
            eval_duration: ns(s.decode_ms),
        }
    }
}

#[derive(Debug, Serialize)]
struct FunctionOut {
    index: usize,
    name: String,
    /// An object, as Ollama sends it.
    arguments: Value,
}

#[derive(Debug, Serialize)]
struct ToolCallOut {
    id: String,
    function: FunctionOut,
}

impl ToolCallOut {
    fn list(calls: &[ToolCall]) -> Vec<Self> {
        calls
            .iter()
            .enumerate()
            .map(|(index, c)| Self {
                id: c.id.clone(),
                function: FunctionOut {
                    index,
                    name: c.name.clone(),
                    arguments: c.arguments.clone(),
                },
            })
            .collect()
    }
}

#[derive(Debug, Serialize)]
struct MessageOut {
    role: &'static str,
    content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallOut>>,
}

/// One line of `/api/generate` or `/api/chat` (the whole answer when not streamed).
#[derive(Debug, Serialize)]
struct Chunk<'a> {
    model: &'a str,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<MessageOut>,
    done: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    end: Option<Durations>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Vec<LogprobOut>>,
}

impl<'a> Chunk<'a> {
    fn new(shape: Shape, model: &'a str, text: String, calls: &[ToolCall]) -> Self {
        let (response, message) = match shape {
            Shape::Generate => (Some(text), None),
            Shape::Chat => (
                None,
                Some(MessageOut {
                    role: "assistant",
                    content: text,
                    tool_calls: (!calls.is_empty()).then(|| ToolCallOut::list(calls)),
                }),
            ),
        };
        Self {
            model,
            created_at: rfc3339(now()),
            response,
            message,
            done: false,
            end: None,
            logprobs: None,
        }
    }

    fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Which endpoint's shape a generation answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Generate,
    Chat,
}

/// Loads (`keep_alive` > 0) or unloads (0) a model for a request with nothing to generate, as Ollama
/// does for an empty prompt or message list.
async fn load_only(
    state: &HttpState,
    model: &str,
    keep_alive: KeepAlive,
    shape: Shape,
) -> Result<Response, OllamaError> {
    let created_at = rfc3339(now());
    let reason = if keep_alive == KeepAlive::Millis(0) {
        let _ = state.handle.unload(model).await;
        "unload"
    } else {
        let mut grant = state.handle.acquire(model, RequestKind::Use).await?;
        grant.keep_alive_after(Some(keep_alive));
        "load"
    };
    #[derive(Serialize)]
    struct Loaded<'a> {
        #[serde(flatten)]
        chunk: Chunk<'a>,
        done_reason: &'static str,
    }
    let mut chunk = Chunk::new(shape, model, String::new(), &[]);
    chunk.created_at = created_at;
    chunk.done = true;
    Ok(Json(Loaded {
        chunk,
        done_reason: reason,
    })
    .into_response())
}

/// Runs `req` and answers in `shape`: one JSON object, or NDJSON lines as Ollama streams them.
async fn answer(
    state: HttpState,
    client: String,
    req: GenerateRequest,
    shape: Shape,
    stream: bool,
) -> Result<Response, OllamaError> {
    let logprobs = req.logprobs.is_some();
    let g = state.core.generate(&client, req).await?;
    let model = g.model().to_string();
    if !stream {
        let a = g.gather().await?;
        let mut c = Chunk::new(shape, &model, a.text, &a.calls);
        c.done = true;
        c.end = Some(Durations::of(&a.stats, a.ending, a.load_ms));
        c.logprobs = logprobs.then(|| LogprobOut::list(&a.logprobs));
        return Ok(Json(c).into_response());
    }
    let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(64);
    let write_timeout = state.handle.write_timeout();
    tokio::spawn(pump(g, tx, write_timeout, move |g, event| {
        let line = match event {
            Ok(Event::Delta(d)) => {
                let mut c = Chunk::new(shape, &model, d.text, &[]);
                c.logprobs = logprobs.then(|| LogprobOut::list(&d.logprobs));
                c.line()
            }
            Ok(Event::ToolCalls(calls)) => Chunk::new(shape, &model, String::new(), &calls).line(),
            Ok(Event::Done(s)) => {
                let mut c = Chunk::new(shape, &model, String::new(), &[]);
                c.done = true;
                c.end = Some(Durations::of(&s, g.ending(&s), g.load_ms()));
                c.line()
            }
            // Ollama reports a failure mid-stream as an error line.
            Err(e) => format!("{}\n", json!({ "error": OllamaError::from(e).message })),
        };
        vec![Ok(line)]
    }));
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

async fn generate(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let v = json_body(body)?;
        let b: GenerateBody = parse(v)?;
        let m = resolve(&state, &b.model).await?;
        let name = m.config.name.clone();
        let keep_alive = keep_alive_from(&b.keep_alive)?;
        check_think(&b.think, &name)?;
        check_images(&b.images, &name)?;
        if b.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(OllamaError::bad(format!(
                "\"{name}\" does not support insert (suffix)"
            )));
        }
        if b.template.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(OllamaError::bad(
                "template is not supported by ult: it renders the model's own chat template",
            ));
        }
        if b.context.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(OllamaError::bad(
                "context (token history) is not supported by ult: send the conversation to /api/chat",
            ));
        }
        if b.prompt.is_empty() && b.system.as_deref().unwrap_or("").is_empty() {
            return load_only(&state, &name, keep_alive, Shape::Generate).await;
        }
        let context = m.inspection.as_ref().map_or(0, |i| i.context);
        let o = options_from(b.options, context, &name)?;
        let chat = m
            .inspection
            .as_ref()
            .is_ok_and(|i| i.kind == ModelKind::Chat && i.template.is_some());
        let input = if b.raw || !chat {
            if b.raw && b.system.is_some() {
                return Err(OllamaError::bad("system cannot be combined with raw"));
            }
            Input::Prompt(b.prompt)
        } else {
            let mut ms = Vec::new();
            if let Some(s) = b.system.filter(|s| !s.is_empty()) {
                ms.push(ChatMessage::new("system", s));
            }
            ms.push(ChatMessage::new("user", b.prompt));
            Input::Messages(ms)
        };
        let req = GenerateRequest {
            max_tokens: o.max_tokens,
            sampling: o.sampling,
            stop: o.stop,
            format: format_from(b.format)?,
            logprobs: b.logprobs.then(|| b.top_logprobs.unwrap_or(0) as usize),
            window: o.window,
            keep_alive: Some(keep_alive),
            ..GenerateRequest::new(name, input)
        };
        answer(state, client_key(Some(peer)), req, Shape::Generate, b.stream.unwrap_or(true)).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let v = json_body(body)?;
        let b: ChatBody = parse(v)?;
        let m = resolve(&state, &b.model).await?;
        let name = m.config.name.clone();
        let keep_alive = keep_alive_from(&b.keep_alive)?;
        check_think(&b.think, &name)?;
        if b.messages.is_empty() {
            return load_only(&state, &name, keep_alive, Shape::Chat).await;
        }
        let context = m.inspection.as_ref().map_or(0, |i| i.context);
        let o = options_from(b.options, context, &name)?;
        let mut messages = Vec::with_capacity(b.messages.len());
        for msg in b.messages {
            check_images(&msg.images, &name)?;
            let tool_calls = msg.tool_calls.map(|calls| {
                Value::Array(
                    calls
                        .into_iter()
                        .map(|c| {
                            json!({ "type": "function", "function": {
                                "name": c.function.name,
                                "arguments": c.function.arguments.unwrap_or_else(|| json!({})),
                            }})
                        })
                        .collect(),
                )
            });
            messages.push(ChatMessage {
                role: msg.role,
                content: msg.content,
                tool_calls,
                tool_call_id: None,
                name: msg.tool_name,
            });
        }
        let tools = match b.tools {
            None => None,
            Some(ts) if ts.is_empty() => None,
            Some(ts) => {
                let mut defs = Vec::with_capacity(ts.len());
                for t in ts {
                    if t.kind.as_deref().is_some_and(|k| k != "function") {
                        return Err(OllamaError::bad(format!(
                            "tools of type {:?} are not supported; use function",
                            t.kind
                        )));
                    }
                    defs.push(ToolDef::new(
                        t.function.name,
                        t.function.description,
                        t.function.parameters,
                    ));
                }
                Some(Tools {
                    defs,
                    choice: ToolChoice::Auto,
                    parallel: true,
                })
            }
        };
        let req = GenerateRequest {
            max_tokens: o.max_tokens,
            sampling: o.sampling,
            stop: o.stop,
            format: format_from(b.format)?,
            logprobs: b.logprobs.then(|| b.top_logprobs.unwrap_or(0) as usize),
            tools,
            window: o.window,
            keep_alive: Some(keep_alive),
            ..GenerateRequest::new(name, Input::Messages(messages))
        };
        answer(
            state,
            client_key(Some(peer)),
            req,
            Shape::Chat,
            b.stream.unwrap_or(true),
        )
        .await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EmbedInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedBody {
    model: String,
    input: EmbedInput,
    truncate: Option<bool>,
    options: Option<Value>,
    keep_alive: Option<Value>,
    dimensions: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingsBody {
    model: String,
    prompt: String,
    options: Option<Value>,
    keep_alive: Option<Value>,
}

/// Ollama's embedding options: none change an embedding, so only the hints are accepted.
fn check_embed_options(v: Option<Value>) -> Result<(), OllamaError> {
    if let Some(Value::Object(o)) = &v
        && let Some(k) = o.keys().find(|k| {
            !matches!(
                k.as_str(),
                "num_ctx"
                    | "num_thread"
                    | "num_gpu"
                    | "num_batch"
                    | "use_mmap"
                    | "use_mlock"
                    | "numa"
                    | "low_vram"
                    | "main_gpu"
            )
        })
    {
        return Err(OllamaError::bad(format!(
            "option {k:?} does not apply to embeddings"
        )));
    }
    Ok(())
}

async fn embed(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let v = json_body(body)?;
        let b: EmbedBody = parse(v)?;
        check_embed_options(b.options)?;
        let keep_alive = keep_alive_from(&b.keep_alive)?;
        let inputs = match b.input {
            EmbedInput::One(s) => vec![s],
            EmbedInput::Many(v) => v,
        };
        let m = resolve(&state, &b.model).await?;
        let started = std::time::Instant::now();
        // Ollama truncates over-long inputs unless told not to.
        let truncate = if b.truncate.unwrap_or(true) {
            Truncate::Keep
        } else {
            Truncate::Refuse
        };
        let e = state
            .core
            .embed(
                &client_key(Some(peer)),
                &m.config.name,
                &inputs,
                truncate,
                Some(keep_alive),
            )
            .await?;
        let mut vectors = e.vectors;
        if let Some(d) = b.dimensions {
            let have = vectors.first().map_or(0, Vec::len);
            if d == 0 || d > have {
                return Err(OllamaError::bad(format!(
                    "dimensions must be 1 to {have} for model {}",
                    e.model
                )));
            }
            // Truncated, then normalised again (as Ollama does).
            for v in &mut vectors {
                v.truncate(d);
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x /= norm);
                }
            }
        }
        #[derive(Serialize)]
        struct Embeddings {
            model: String,
            embeddings: Vec<Vec<f32>>,
            total_duration: u64,
            load_duration: u64,
            prompt_eval_count: usize,
        }
        Ok(Json(Embeddings {
            model: e.model,
            embeddings: vectors,
            total_duration: started.elapsed().as_nanos() as u64,
            load_duration: e.load_ms.map_or(0, |ms| ms * 1_000_000),
            prompt_eval_count: e.prompt_tokens,
        })
        .into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn embeddings(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let v = json_body(body)?;
        let b: EmbeddingsBody = parse(v)?;
        check_embed_options(b.options)?;
        let keep_alive = keep_alive_from(&b.keep_alive)?;
        let m = resolve(&state, &b.model).await?;
        let e = state
            .core
            .embed(
                &client_key(Some(peer)),
                &m.config.name,
                &[b.prompt],
                Truncate::Keep,
                Some(keep_alive),
            )
            .await?;
        let v = e.vectors.into_iter().next().unwrap_or_default();
        #[derive(Serialize)]
        struct Embedding {
            embedding: Vec<f32>,
        }
        Ok::<_, OllamaError>(Json(Embedding { embedding: v }).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Serialize)]
struct Version {
    version: &'static str,
    ult: &'static str,
}

async fn version() -> Json<Version> {
    Json(Version {
        version: API_VERSION,
        ult: env!("CARGO_PKG_VERSION"),
    })
}

/// A stable identifier of a model's configuration (its name, path and size), shaped as Ollama's digest.
fn digest(name: &str, path: &std::path::Path, bytes: u64) -> String {
    use std::hash::{Hash, Hasher};
    let mut out = String::with_capacity(64);
    for salt in 0u64..4 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (salt, name, path, bytes).hash(&mut h);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// A model's `details`. ult reads no parameter count or quantization label from headers, so those
/// stay empty rather than guessed.
#[derive(Debug, Serialize)]
struct Details {
    parent_model: &'static str,
    format: &'static str,
    family: String,
    families: Vec<String>,
    parameter_size: &'static str,
    quantization_level: &'static str,
}

fn details(m: &crate::registry::RegisteredModel) -> Details {
    let arch = m
        .inspection
        .as_ref()
        .map(|i| i.architecture.clone())
        .unwrap_or_default();
    Details {
        parent_model: "",
        format: if m.source.path.extension().is_some_and(|e| e == "gguf") {
            "gguf"
        } else {
            "safetensors"
        },
        families: vec![arch.clone()],
        family: arch,
        parameter_size: "",
        quantization_level: "",
    }
}

/// An entry of `/api/tags` (without the `ps` fields) or of `/api/ps`.
#[derive(Debug, Serialize)]
struct ModelOut {
    name: String,
    model: String,
    size: u64,
    digest: String,
    details: Details,
    #[serde(skip_serializing_if = "Option::is_none")]
    modified_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size_vram: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context_length: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Models {
    models: Vec<ModelOut>,
}

fn modified_at(m: &crate::registry::RegisteredModel) -> String {
    let t = std::fs::metadata(&m.source.path)
        .and_then(|md| md.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    rfc3339(t)
}

async fn tags(State(state): State<HttpState>) -> Response {
    let result = async {
        let status = state.handle.status().await?;
        let models = status
            .models
            .iter()
            .filter(|m| m.model.inspection.is_ok())
            .map(|m| {
                let size = m.model.inspection.as_ref().map_or(0, |i| i.load_bytes);
                let name = m.model.config.name.clone();
                ModelOut {
                    digest: digest(&name, &m.model.source.path, size),
                    model: name.clone(),
                    name,
                    size,
                    details: details(&m.model),
                    modified_at: Some(modified_at(&m.model)),
                    size_vram: None,
                    expires_at: None,
                    context_length: None,
                }
            })
            .collect();
        Ok::<_, OllamaError>(Json(Models { models }).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn ps(State(state): State<HttpState>) -> Response {
    let result = async {
        let status = state.handle.status().await?;
        let on_gpu = !status.device.starts_with("cpu");
        let mut models = Vec::new();
        for m in &status.models {
            let Some(v) = m
                .view
                .as_ref()
                .filter(|v| v.residency == Residency::Resident)
            else {
                continue;
            };
            let size = v.measured_bytes.unwrap_or(v.charged_bytes);
            // In use: it stays; idle: its keep-alive runs from when it went idle.
            let expires_at = match v.keep_alive {
                KeepAlive::Forever => rfc3339(now() + Duration::from_secs(100 * 365 * 86_400)),
                KeepAlive::Millis(ms) => {
                    let left = ms.saturating_sub(v.idle_ms.unwrap_or(0));
                    rfc3339(now() + Duration::from_millis(left))
                }
            };
            let name = m.model.config.name.clone();
            let file_bytes = m.model.inspection.as_ref().map_or(0, |i| i.load_bytes);
            models.push(ModelOut {
                digest: digest(&name, &m.model.source.path, file_bytes),
                model: name.clone(),
                name,
                size,
                details: details(&m.model),
                modified_at: None,
                size_vram: Some(if on_gpu { size } else { 0 }),
                expires_at: Some(expires_at),
                context_length: Some(m.model.inspection.as_ref().map_or(0, |i| i.context)),
            });
        }
        Ok::<_, OllamaError>(Json(Models { models }).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Deserialize)]
struct ShowBody {
    #[serde(alias = "name")]
    model: String,
    #[serde(rename = "verbose")]
    _verbose: Option<bool>,
}

async fn show(
    State(state): State<HttpState>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let v = json_body(body)?;
        let b: ShowBody = parse(v)?;
        let m = resolve(&state, &b.model).await?;
        let insp = m.inspection.as_ref().map_err(|reason| {
            OllamaError::from(ServiceError::Unavailable {
                model: m.config.name.clone(),
                reason: reason.clone(),
            })
        })?;
        let arch = &insp.architecture;
        let mut capabilities = Vec::new();
        match insp.kind {
            ModelKind::Embedding => capabilities.push("embedding"),
            ModelKind::Chat => {
                capabilities.push("completion");
                capabilities.push("tools");
            }
            ModelKind::Completion => capabilities.push("completion"),
        }
        let mut info = serde_json::Map::new();
        info.insert("general.architecture".into(), json!(arch));
        info.insert(format!("{arch}.context_length"), json!(insp.context));
        info.insert("ult.predicted_bytes".into(), json!(insp.footprint.total()));
        #[derive(Serialize)]
        struct Show<'a> {
            modelfile: String,
            parameters: &'static str,
            template: &'a str,
            details: Details,
            model_info: serde_json::Map<String, Value>,
            capabilities: Vec<&'static str>,
            modified_at: String,
        }
        Ok::<_, OllamaError>(
            Json(Show {
                modelfile: format!(
                    "# ult serves this model from models.toml\nFROM {}\n",
                    m.source.path.display()
                ),
                parameters: "",
                template: insp.template.as_ref().map_or("", |t| t.source()),
                details: details(&m),
                model_info: info,
                capabilities,
                modified_at: modified_at(&m),
            })
            .into_response(),
        )
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The warning when the default address is taken: ultd serves everything else.
pub fn default_port_taken_message(addr: SocketAddr, e: &std::io::Error) -> String {
    format!(
        "Ollama's API is off: {addr} is taken ({e}); Ollama itself may be running. Set [daemon] ollama to another address to serve it, or \"off\" to silence this"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_reads_numbers_and_go_durations() {
        let k = |v: Value| keep_alive_from(&Some(v)).ok();
        assert_eq!(keep_alive_from(&None).ok(), Some(DEFAULT_KEEP_ALIVE));
        assert_eq!(k(json!(0)), Some(KeepAlive::Millis(0)));
        assert_eq!(k(json!(-1)), Some(KeepAlive::Forever));
        assert_eq!(k(json!("-1m")), Some(KeepAlive::Forever));
        assert_eq!(k(json!(30)), Some(KeepAlive::Millis(30_000)));
        assert_eq!(k(json!("1h30m")), Some(KeepAlive::Millis(5_400_000)));
        assert_eq!(k(json!("10s")), Some(KeepAlive::Millis(10_000)));
        assert_eq!(k(json!("1.5s")), Some(KeepAlive::Millis(1_500)));
        assert!(k(json!("soon")).is_none());
        assert!(k(json!("5x")).is_none());
        assert!(k(json!([1])).is_none());
    }

    #[test]
    fn options_map_onto_sampling_with_ollama_defaults() {
        let o = options_from(None, 2048, "m").ok().unwrap();
        assert_eq!(o.sampling.temperature, 0.8);
        assert_eq!(o.sampling.top_k, Some(40));
        assert_eq!(o.sampling.repetition_penalty, 1.1);
        assert_eq!(o.max_tokens, None);
        let o = options_from(
            Some(json!({"temperature": 0, "num_predict": 12, "seed": 7, "stop": ["\n"], "num_ctx": 512, "num_gpu": 99})),
            2048,
            "m",
        )
        .ok()
        .unwrap();
        assert_eq!(
            (o.sampling.temperature, o.max_tokens, o.sampling.seed),
            (0.0, Some(12), Some(7))
        );
        assert_eq!((o.window, o.stop.len()), (Some(512), 1));
        let err = |v: Value| options_from(Some(v), 2048, "m").err().map(|e| e.message);
        assert!(
            err(json!({"num_ctx": 4096}))
                .unwrap()
                .contains("models.toml")
        );
        assert!(err(json!({"mirostat": 2})).unwrap().contains("mirostat"));
        assert!(err(json!({"colour": 1})).unwrap().contains("colour"));
        assert!(
            err(json!({"presence_penalty": 0.5}))
                .unwrap()
                .contains("presence_penalty")
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(
            rfc3339(Duration::from_secs(0)),
            "1970-01-01T00:00:00.000000000Z"
        );
        assert_eq!(
            rfc3339(Duration::new(1_796_154_906, 5)),
            "2026-12-01T19:55:06.000000005Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000000Z"
        );
    }

    #[test]
    fn formats() {
        assert_eq!(
            format_from(Some(json!("json"))).ok(),
            Some(OutputFormat::JsonObject)
        );
        assert_eq!(format_from(Some(json!(""))).ok(), Some(OutputFormat::Text));
        assert!(format_from(Some(json!("xml"))).is_err());
        assert!(matches!(
            format_from(Some(json!({"type": "object"}))),
            Ok(OutputFormat::JsonSchema(_))
        ));
    }
}
