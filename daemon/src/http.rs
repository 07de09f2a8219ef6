//! The OpenAI-compatible HTTP API and Prometheus metrics, served by the same daemon and the same state
//! owner as gRPC: `POST /v1/chat/completions` (with server-sent events), `POST /v1/completions`,
//! `POST /v1/embeddings`, `GET /v1/models`, `GET /metrics`, `GET /healthz`. Errors use OpenAI's JSON shape
//! and status codes.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use ult_policy::{Rejection, Residency};

use crate::error::ServiceError;
use crate::generation::{Core, Truncate};
use crate::limits::client_key;
use crate::metrics::Metrics;
use crate::supervisor::Handle;
use ult_engine::{EngineError, ModelKind};

/// What the HTTP handlers share.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The state owner.
    pub handle: Handle,
    /// The request core.
    pub core: Core,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// A bearer token every request must carry, if set.
    pub token: Option<Arc<str>>,
}

/// The bearer-token check of an HTTP front: a request without the configured token gets `refuse()` and
/// is counted under `front`.
#[derive(Clone)]
pub struct BearerCheck {
    /// The front's state (token and metrics).
    pub state: HttpState,
    /// The front's name in metrics.
    pub front: &'static str,
    /// The front's refusal.
    pub refuse: fn() -> Response,
}

async fn bearer(
    State(check): State<BearerCheck>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !crate::auth::bearer_ok(check.state.token.as_deref(), header) {
        check.state.metrics.unauthenticated(check.front);
        return (check.refuse)();
    }
    next.run(req).await
}

/// `router`'s routes so far, behind `check`.
pub fn with_bearer(router: Router<HttpState>, check: BearerCheck) -> Router<HttpState> {
    router.route_layer(axum::middleware::from_fn_with_state(check, bearer))
}

/// The routes, with a request body limit of `max_body` bytes.
pub fn router(state: HttpState, max_body: usize) -> Router {
    let routes = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/metrics", get(metrics));
    let check = BearerCheck {
        state: state.clone(),
        front: "http",
        refuse: || ApiError::unauthorized().into_response(),
    };
    with_bearer(routes, check)
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
    param: Option<String>,
    code: Option<&'static str>,
    retry_after_s: Option<u64>,
}

impl ApiError {
    /// An error of `status` and OpenAI `kind`.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// A 400 about `param`.
    pub fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
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
                    param: Some("model".into()),
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
                param: Some("model".into()),
                ..Self::new(StatusCode::FORBIDDEN, "permission_error", message)
            },
            ServiceError::TooManyRequests { .. } => Self {
                code: Some("rate_limit_exceeded"),
                retry_after_s: Some(1),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
            ServiceError::WrongKind { .. } | ServiceError::NoChatTemplate { .. } => Self {
                code: Some("model_not_supported"),
                param: Some("model".into()),
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
                param: Some("messages".into()),
                ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            },
            ServiceError::InvalidArgument { field, .. } => Self::bad_request(*field, message),
            ServiceError::InvalidConfig { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            }
            ServiceError::Engine(EngineError::InvalidParameter { field, .. }) => {
                Self::bad_request(*field, message)
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

impl ApiError {
    /// Its HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Its message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Seconds a client should wait before retrying, when it should.
    pub fn retry_after_s(&self) -> Option<u64> {
        self.retry_after_s
    }

    /// The error as OpenAI writes it.
    pub fn body(&self) -> Value {
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        serde_json::to_value(Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// Seconds since the Unix epoch.
pub fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

async fn chat_completions(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let result = async {
        let Json(req) = body?;
        crate::openai::chat(state, client_key(Some(peer)), req).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let result = async {
        let Json(req) = body?;
        crate::openai::completions(state, client_key(Some(peer)), req).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The field a request named that its type (with `deny_unknown_fields`) does not know, from serde's
/// message ("unknown field `x`, expected one of …").
pub fn unknown_field(e: &serde_json::Error) -> Option<String> {
    let text = e.to_string();
    let rest = text.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Reads a request from its JSON body. A field the request type does not know is refused by name
/// (`param` set to it): ult answers only what it can honour.
pub fn parse_body<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| {
        let text = e.to_string();
        if let Some(name) = unknown_field(&e) {
            return ApiError::bad_request(
                name.clone(),
                format!("unsupported parameter `{name}`: ult does not implement it"),
            );
        }
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            json_error_message(&text),
        )
    })
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
        let e = state
            .core
            .embed(
                &client_key(Some(peer)),
                &req.model,
                &inputs,
                Truncate::Refuse,
                None,
            )
            .await?;
        if let Some(d) = req.dimensions
            && e.vectors.first().is_some_and(|v| v.len() != d)
        {
            return Err(ApiError::bad_request(
                "dimensions",
                format!("model {} has {} dimensions", e.model, e.vectors[0].len()),
            ));
        }
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Vector {
            Floats(Vec<f32>),
            Base64(String),
        }
        #[derive(Serialize)]
        struct Item {
            object: &'static str,
            index: usize,
            embedding: Vector,
        }
        #[derive(Serialize)]
        struct Tokens {
            prompt_tokens: usize,
            total_tokens: usize,
        }
        #[derive(Serialize)]
        struct List {
            object: &'static str,
            data: Vec<Item>,
            model: String,
            usage: Tokens,
        }
        let data = e
            .vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| Item {
                object: "embedding",
                index,
                embedding: if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    Vector::Floats(v)
                },
            })
            .collect();
        Ok(Json(List {
            object: "list",
            data,
            model: e.model,
            usage: Tokens {
                prompt_tokens: e.prompt_tokens,
                total_tokens: e.prompt_tokens,
            },
        })
        .into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// ult's own view of a model in `/v1/models`, under `"ult"`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum UltView {
    Model {
        kind: &'static str,
        state: &'static str,
        failure: Option<String>,
        aliases: Vec<String>,
        architecture: Option<String>,
        context_tokens: Option<usize>,
        predicted_bytes: Option<u64>,
        measured_bytes: Option<u64>,
        charged_bytes: Option<u64>,
        pinned: bool,
        in_flight: u32,
        completion_only: bool,
    },
    Route {
        route: Vec<String>,
        strategy: &'static str,
    },
}

#[derive(Debug, Serialize)]
struct ModelEntry {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    ult: UltView,
}

async fn model_entries(state: &HttpState) -> Result<Vec<ModelEntry>, ApiError> {
    let status = state.handle.status().await?;
    let created = unix_s().saturating_sub(status.uptime_ms / 1000);
    let mut out = Vec::new();
    for m in &status.models {
        let config = &m.model.config;
        let insp = m.model.inspection.as_ref().ok();
        let view = m.view.as_ref();
        let state_name = match (&m.model.inspection, view.map(|v| v.residency)) {
            (Err(_), _) | (_, Some(Residency::Failed)) => "failed",
            (_, Some(Residency::Loading)) => "loading",
            (_, Some(Residency::Resident)) => "resident",
            (_, Some(Residency::Unloading)) => "unloading",
            _ => "unloaded",
        };
        out.push(ModelEntry {
            id: config.name.clone(),
            object: "model",
            created,
            owned_by: "ult",
            ult: UltView::Model {
                kind: insp.map_or(config.kind, |i| i.kind).as_str(),
                state: state_name,
                failure: view
                    .and_then(|v| v.failure.clone())
                    .or_else(|| m.model.inspection.as_ref().err().cloned()),
                aliases: config.aliases.clone(),
                architecture: insp.map(|i| i.architecture.clone()),
                context_tokens: insp.map(|i| i.context),
                predicted_bytes: insp.map(|i| i.footprint.total()),
                measured_bytes: view.and_then(|v| v.measured_bytes),
                charged_bytes: view.map(|v| v.charged_bytes),
                pinned: view.is_some_and(|v| v.pinned),
                in_flight: view.map_or(0, |v| v.in_flight),
                completion_only: insp.is_some_and(|i| i.kind == ModelKind::Completion),
            },
        });
    }
    for r in &status.routes {
        out.push(ModelEntry {
            id: r.name.clone(),
            object: "model",
            created,
            owned_by: "ult",
            ult: UltView::Route {
                route: r.models.clone(),
                strategy: r.strategy.as_str(),
            },
        });
    }
    Ok(out)
}

async fn list_models(State(state): State<HttpState>) -> Response {
    #[derive(Serialize)]
    struct List {
        object: &'static str,
        data: Vec<ModelEntry>,
    }
    match model_entries(&state).await {
        Ok(data) => Json(List {
            object: "list",
            data,
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_model(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    match model_entries(&state).await {
        Ok(data) => match data.into_iter().find(|m| m.id == id) {
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
