//! The OpenAI-compatible HTTP API and Prometheus metrics, served by the same daemon and the same state
//! owner as gRPC: `POST /v1/chat/completions` (with server-sent events), `POST /v1/completions`,
//! `POST /v1/embeddings`, `GET /v1/models`, `GET /metrics`, `GET /healthz`. Errors use OpenAI's JSON shape
//! and status codes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use ult_policy::{Rejection, Residency};

use crate::error::ServiceError;
use crate::generation::{Input, embed, start_generation};
use crate::limits::client_key;
use crate::metrics::{Metrics, outcome_of};
use crate::supervisor::Handle;
use crate::worker::{FinishReason, GenEvent, GenStats};
use ult_engine::sampler::SamplingParams;
use ult_engine::template::ChatMessage;
use ult_engine::{EngineError, ModelKind};

/// What the HTTP handlers share.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The state owner.
    pub handle: Handle,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// A bearer token every request must carry, if set.
    pub token: Option<Arc<str>>,
}

/// The routes, with a request body limit of `max_body` bytes.
pub fn router(state: HttpState, max_body: usize) -> Router {
    let auth_state = state.clone();
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let state = auth_state.clone();
                async move {
                    if let Some(token) = &state.token {
                        let ok = req
                            .headers()
                            .get(header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .is_some_and(|t| {
                                crate::auth::constant_time_eq(t.as_bytes(), token.as_bytes())
                            });
                        if !ok {
                            state.metrics.unauthenticated("http");
                            return ApiError::unauthorized().into_response();
                        }
                    }
                    next.run(req).await
                }
            },
        ))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    fn bad_request(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or wrong bearer token",
            )
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let message = ult_engine::without_backtrace(&e.to_string()).to_string();
        match &e {
            ServiceError::Rejected(r) => match r {
                Rejection::UnknownModel { .. } | Rejection::UnknownLease { .. } => Self {
                    code: Some("model_not_found"),
                    param: Some("model"),
                    ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
                },
                Rejection::LargerThanCeiling { .. } => Self {
                    code: Some("insufficient_memory"),
                    ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                },
                Rejection::Exhausted { .. } | Rejection::Pressure { .. } => Self {
                    code: Some("insufficient_memory"),
                    retry_after_s: Some(5),
                    ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                },
                Rejection::LoadFailed { retry_in_ms, .. } => Self {
                    code: Some("model_load_failed"),
                    retry_after_s: Some(retry_in_ms.div_ceil(1000).max(1)),
                    ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                },
                Rejection::CannotUnload { .. } => {
                    Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
                }
            },
            ServiceError::WaitTimeout { .. } => Self {
                code: Some("insufficient_memory"),
                retry_after_s: Some(5),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            },
            ServiceError::Unavailable { .. }
            | ServiceError::ShuttingDown
            | ServiceError::EndedByShutdown { .. } => Self {
                retry_after_s: Some(5),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            },
            ServiceError::PathNotAllowed { .. } => Self {
                code: Some("model_not_found"),
                param: Some("model"),
                ..Self::new(StatusCode::FORBIDDEN, "permission_error", message)
            },
            ServiceError::TooManyRequests { .. } => Self {
                code: Some("rate_limit_exceeded"),
                retry_after_s: Some(1),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
            ServiceError::WrongKind { .. } | ServiceError::NoChatTemplate { .. } => Self {
                code: Some("model_not_supported"),
                param: Some("model"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            },
            ServiceError::RequestMemory { .. } => Self {
                code: Some("insufficient_memory"),
                retry_after_s: Some(1),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            },
            ServiceError::Internal(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            }
            ServiceError::PromptTooLong { .. }
            | ServiceError::Engine(EngineError::ContextTooLong { .. }) => Self {
                code: Some("context_length_exceeded"),
                param: Some("messages"),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            },
            ServiceError::InvalidArgument { field, .. } => Self::bad_request(field, message),
            ServiceError::Engine(EngineError::InvalidParameter { field, .. }) => {
                Self::bad_request(field, message)
            }
            ServiceError::Engine(EngineError::EmptyPrompt) => Self::bad_request("prompt", message),
            ServiceError::Engine(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    /// Every malformed body is a 400 (as OpenAI answers), naming the field and the JSON type it wants
    /// rather than the Rust type it is parsed into.
    fn from(r: JsonRejection) -> Self {
        let (status, message) = match &r {
            JsonRejection::MissingJsonContentType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the body as JSON with `content-type: application/json`".to_string(),
            ),
            JsonRejection::BytesRejection(_) => (StatusCode::PAYLOAD_TOO_LARGE, r.body_text()),
            _ => (StatusCode::BAD_REQUEST, json_error_message(&r.body_text())),
        };
        Self::new(status, "invalid_request_error", message)
    }
}

/// serde's message for a body that does not parse, in JSON's words: "max_tokens: invalid type: string
/// \"x\", expected u32 at line 1 column 40" becomes "invalid body: max_tokens: expected an integer, got
/// a string (line 1, column 40)".
fn json_error_message(text: &str) -> String {
    let text = text
        .trim_start_matches("Failed to deserialize the JSON body into the target type: ")
        .trim_start_matches("Failed to parse the request body as JSON: ");
    let mut out = text.to_string();
    for (rust, json) in [
        ("expected u8", "expected an integer"),
        ("expected u16", "expected an integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected i32", "expected an integer"),
        ("expected i64", "expected an integer"),
        ("expected usize", "expected a non-negative integer"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
        ("expected a sequence", "expected an array"),
        ("expected a borrowed string", "expected a string"),
        ("expected struct ", "expected an object "),
        ("expected a map", "expected an object"),
        ("invalid type: ", ""),
    ] {
        out = out.replace(rust, json);
    }
    // "… at line 1 column 40" reads as a position, not part of the sentence.
    if let Some(i) = out.rfind(" at line ") {
        let (head, tail) = out.split_at(i);
        let tail = tail
            .trim_start_matches(" at ")
            .replacen(" column", ", column", 1);
        out = format!("{head} ({tail})");
    }
    format!("invalid body: {out}")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code }
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{prefix}-{:016x}", h.finish())
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
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
                        _ => {
                            return Err(ApiError::bad_request(
                                "messages",
                                "only text content parts are supported",
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
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The sampling fields shared by chat and completions.
#[derive(Debug, Deserialize)]
struct Sampling {
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    logprobs: Option<Value>,
    /// An extension llama.cpp's server and vLLM accept too: keep generating past end-of-sequence tokens
    /// (for benchmarks that need exactly `max_tokens`).
    #[serde(default)]
    ignore_eos: bool,
}

impl Sampling {
    /// OpenAI's defaults: temperature 1 and top_p 1 when unset.
    fn params(&self) -> Result<(SamplingParams, Vec<String>), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("n", "only n = 1 is supported"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| v.as_bool() != Some(false) && !v.is_null())
        {
            return Err(ApiError::bad_request(
                "logprobs",
                "logprobs are not supported",
            ));
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p,
            seed: self.seed,
            ..SamplingParams::default()
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(x)) => vec![x.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        Ok((sampling, stop))
    }
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Prompt,
    max_tokens: Option<u32>,
    #[serde(default)]
    echo: bool,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: EmbeddingInput,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::Context => "length",
    }
}

fn usage(s: &GenStats) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": s.cached_tokens },
    })
}

/// Which response shape a generation streams or returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Chat,
    Completion,
}

#[allow(clippy::too_many_arguments)]
async fn generate(
    state: HttpState,
    client: String,
    shape: Shape,
    model: String,
    input: Input,
    max_tokens: Option<u32>,
    sampling: Sampling,
) -> Result<Response, ApiError> {
    let (params, stop) = sampling.params()?;
    let include_usage = sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let started = start_generation(
        &state.handle,
        &client,
        &model,
        input,
        max_tokens,
        params,
        stop,
        sampling.ignore_eos,
    )
    .await;
    let mut g = match started {
        Ok(g) => g,
        Err(e) => {
            state
                .metrics
                .request(&model, "generate", outcome_of(&Err(&e)));
            return Err(e.into());
        }
    };
    let id = request_id(if shape == Shape::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = unix_s();
    let served = g.model().to_string();
    if !sampling.stream {
        let mut text = String::new();
        loop {
            match g.next().await {
                Err(e) => return Err(e.into()),
                Ok(Some(GenEvent::Delta(t))) => text.push_str(&t),
                Ok(Some(GenEvent::Done(s))) => {
                    state.metrics.request(&served, "generate", "ok");
                    state.metrics.generated(
                        &served,
                        s.prompt_tokens as u64,
                        s.completion_tokens as u64,
                        s.ttft_ms,
                    );
                    let choice = match shape {
                        Shape::Chat => json!({
                            "index": 0,
                            "message": { "role": "assistant", "content": text },
                            "finish_reason": finish_reason(s.finish),
                            "logprobs": null,
                        }),
                        Shape::Completion => json!({
                            "index": 0, "text": text, "finish_reason": finish_reason(s.finish), "logprobs": null,
                        }),
                    };
                    let object = if shape == Shape::Chat {
                        "chat.completion"
                    } else {
                        "text_completion"
                    };
                    return Ok(Json(json!({
                        "id": id, "object": object, "created": created, "model": served,
                        "choices": [choice], "usage": usage(&s),
                        "system_fingerprint": format!("ult-{}", env!("CARGO_PKG_VERSION")),
                    }))
                    .into_response());
                }
                Ok(Some(GenEvent::Failed(e))) => {
                    let e = ServiceError::Engine(e);
                    state
                        .metrics
                        .request(&served, "generate", outcome_of(&Err(&e)));
                    return Err(e.into());
                }
                Ok(None) => return Err(ServiceError::Engine(EngineError::WorkerGone).into()),
            }
        }
    }
    // Streaming: one chunk per delta, a final chunk with the finish reason, usage if asked, then [DONE].
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let write_timeout = state.handle.write_timeout();
    tokio::spawn(async move {
        let object = if shape == Shape::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |delta: Value, finish: Option<&str>| -> Event {
            let choice = match shape {
                Shape::Chat => {
                    json!({ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null })
                }
                Shape::Completion => json!({
                    "index": 0, "text": delta["content"].as_str().unwrap_or(""), "finish_reason": finish, "logprobs": null,
                }),
            };
            Event::default().data(json!({ "id": id, "object": object, "created": created, "model": served, "choices": [choice] }).to_string())
        };
        if shape == Shape::Chat
            && tx
                .send(Ok(chunk(
                    json!({ "role": "assistant", "content": "" }),
                    None,
                )))
                .await
                .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                event = g.next() => match event {
                    Ok(Some(GenEvent::Delta(t))) => {
                        match tx.send_timeout(Ok(chunk(json!({ "content": t }), None)), write_timeout).await {
                            Ok(()) => {}
                            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                                // The client stopped reading: dropping the generation cancels it.
                                tracing::info!(model = %served, timeout_ms = write_timeout.as_millis() as u64, "stream cancelled: the client did not read");
                                state.metrics.request(&served, "generate", "stalled");
                                break;
                            }
                            Err(mpsc::error::SendTimeoutError::Closed(_)) => break,
                        }
                    }
                    Ok(Some(GenEvent::Done(s))) => {
                        state.metrics.request(&served, "generate", "ok");
                        state.metrics.generated(&served, s.prompt_tokens as u64, s.completion_tokens as u64, s.ttft_ms);
                        let _ = tx.send(Ok(chunk(json!({}), Some(finish_reason(s.finish))))).await;
                        if include_usage {
                            let last = json!({ "id": id, "object": object, "created": created, "model": served, "choices": [], "usage": usage(&s) });
                            let _ = tx.send(Ok(Event::default().data(last.to_string()))).await;
                        }
                        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                        break;
                    }
                    Ok(Some(GenEvent::Failed(e))) => {
                        let e = ServiceError::Engine(e);
                        state.metrics.request(&served, "generate", outcome_of(&Err(&e)));
                        let body = json!({ "error": { "message": e.to_string(), "type": "server_error", "param": null, "code": null } });
                        let _ = tx.send(Ok(Event::default().data(body.to_string()))).await;
                        break;
                    }
                    Err(e) => {
                        state.metrics.request(&served, "generate", "shutdown");
                        let body = json!({ "error": { "message": e.to_string(), "type": "server_error", "param": null, "code": "shutting_down" } });
                        let _ = tx.send(Ok(Event::default().data(body.to_string()))).await;
                        break;
                    }
                    Ok(None) => break,
                },
                // The client went away: dropping the generation cancels it at the next decode step.
                () = tx.closed() => {
                    state.metrics.request(&served, "generate", "cancelled");
                    break;
                }
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).into_response())
}

async fn chat_completions(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let result = async {
        let Json(req) = body?;
        let mut messages = Vec::with_capacity(req.messages.len());
        for m in req.messages {
            let content = match m.content {
                Some(c) => c.text()?,
                None => String::new(),
            };
            messages.push(ChatMessage {
                role: m.role,
                content,
            });
        }
        let max = req.max_completion_tokens.or(req.max_tokens);
        generate(
            state,
            client_key(Some(peer)),
            Shape::Chat,
            req.model,
            Input::Messages(messages),
            max,
            req.sampling,
        )
        .await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    let result = async {
        let Json(req) = body?;
        if req.echo {
            return Err(ApiError::bad_request("echo", "echo is not supported"));
        }
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
        // OpenAI's completions default is 16 tokens.
        let max = Some(req.max_tokens.unwrap_or(16));
        generate(
            state,
            client_key(Some(peer)),
            Shape::Completion,
            req.model,
            Input::Prompt(prompt),
            max,
            req.sampling,
        )
        .await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn embeddings(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<EmbeddingRequest>, JsonRejection>,
) -> Response {
    let result = async {
        let Json(req) = body?;
        let inputs = match req.input {
            EmbeddingInput::One(s) => vec![s],
            EmbeddingInput::Many(v) => v,
        };
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "encoding_format",
                    format!("unknown encoding {other:?}; use float or base64"),
                ));
            }
        };
        let e = match embed(&state.handle, &client_key(Some(peer)), &req.model, &inputs).await {
            Ok(e) => e,
            Err(err) => {
                state
                    .metrics
                    .request(&req.model, "embed", outcome_of(&Err(&err)));
                return Err(err.into());
            }
        };
        if let Some(d) = req.dimensions
            && e.vectors.first().is_some_and(|v| v.len() != d)
        {
            return Err(ApiError::bad_request(
                "dimensions",
                format!("model {} has {} dimensions", e.model, e.vectors[0].len()),
            ));
        }
        state.metrics.request(&e.model, "embed", "ok");
        state.metrics.embedded(&e.model, e.prompt_tokens as u64);
        let data: Vec<Value> = e
            .vectors
            .iter()
            .enumerate()
            .map(|(index, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({ "object": "embedding", "index": index, "embedding": embedding })
            })
            .collect();
        Ok(Json(json!({
            "object": "list", "data": data, "model": e.model,
            "usage": { "prompt_tokens": e.prompt_tokens, "total_tokens": e.prompt_tokens },
        }))
        .into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn model_entries(state: &HttpState) -> Result<Vec<Value>, ApiError> {
    let status = state.handle.status().await?;
    let created = unix_s().saturating_sub(status.uptime_ms / 1000);
    let mut out = Vec::new();
    for m in &status.models {
        let config = &m.model.config;
        let insp = m.model.inspection.as_ref().ok();
        let state_name = match (&m.model.inspection, m.view.as_ref().map(|v| v.residency)) {
            (Err(_), _) | (_, Some(Residency::Failed)) => "failed",
            (_, Some(Residency::Loading)) => "loading",
            (_, Some(Residency::Resident)) => "resident",
            (_, Some(Residency::Unloading)) => "unloading",
            _ => "unloaded",
        };
        out.push(json!({
            "id": config.name, "object": "model", "created": created, "owned_by": "ult",
            "ult": {
                "kind": insp.map_or(config.kind, |i| i.kind).as_str(),
                "state": state_name,
                "failure": m.view.as_ref().and_then(|v| v.failure.clone()).or_else(|| m.model.inspection.as_ref().err().cloned()),
                "aliases": config.aliases,
                "architecture": insp.map(|i| i.architecture.clone()),
                "context_tokens": insp.map(|i| i.context),
                "predicted_bytes": insp.map(|i| i.footprint.total()),
                "measured_bytes": m.view.as_ref().and_then(|v| v.measured_bytes),
                "charged_bytes": m.view.as_ref().map(|v| v.charged_bytes),
                "pinned": m.view.as_ref().is_some_and(|v| v.pinned),
                "in_flight": m.view.as_ref().map_or(0, |v| v.in_flight),
                "completion_only": insp.is_some_and(|i| i.kind == ModelKind::Completion),
            },
        }));
    }
    for r in &status.routes {
        out.push(json!({
            "id": r.name, "object": "model", "created": created, "owned_by": "ult",
            "ult": { "route": r.models, "strategy": r.strategy.as_str() },
        }));
    }
    Ok(out)
}

async fn list_models(State(state): State<HttpState>) -> Response {
    match model_entries(&state).await {
        Ok(data) => Json(json!({ "object": "list", "data": data })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_model(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    match model_entries(&state).await {
        Ok(data) => match data.into_iter().find(|m| m["id"] == id) {
            Some(m) => Json(m).into_response(),
            None => ApiError::from(ServiceError::Rejected(Rejection::UnknownModel {
                name: id,
                known: Vec::new(),
            }))
            .into_response(),
        },
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    match state.handle.status().await {
        Ok(status) => {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            (headers, state.metrics.render(&status, state.handle.work())).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_openai_shape_and_status() {
        let e = ApiError::from(ServiceError::Rejected(Rejection::UnknownModel {
            name: "x".into(),
            known: vec![],
        }));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.code, Some("model_not_found"));
        assert_eq!(
            json_error_message(
                "Failed to deserialize the JSON body into the target type: max_tokens: invalid type: string \"x\", expected u32 at line 1 column 40"
            ),
            "invalid body: max_tokens: string \"x\", expected a non-negative integer (line 1, column 40)"
        );
        let e = ApiError::from(ServiceError::PromptTooLong {
            model: "m".into(),
            bytes: 90,
            limit: 3,
            at_least: 9,
            context_tokens: 4,
        });
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, Some("context_length_exceeded"))
        );
        let e = ApiError::from(ServiceError::Rejected(Rejection::Pressure {
            model: "m".into(),
            reason: "r".into(),
        }));
        assert_eq!(
            (e.status, e.retry_after_s),
            (StatusCode::SERVICE_UNAVAILABLE, Some(5))
        );
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
    }
}
