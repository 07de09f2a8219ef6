//! The daemon's request errors and their one mapping to gRPC status codes.

use ult_policy::{HoldReason, Rejection};

use ult_engine::{EngineError, ModelKind};

/// Why a request failed. Every variant maps to one gRPC code in `From<ServiceError> for tonic::Status`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The policy refused (unknown model, no memory, pressure, failed load, …).
    #[error("{0}")]
    Rejected(Rejection),
    /// The model's files could not be read at boot; it stays unavailable until ultd restarts.
    #[error("model {model} is unavailable: {reason}")]
    Unavailable {
        /// The model.
        model: String,
        /// Why.
        reason: String,
    },
    /// The request does not fit the model's kind.
    #[error("model {model} is a {actual} model; this request needs a {wanted} model")]
    WrongKind {
        /// The model.
        model: String,
        /// What it is.
        actual: &'static str,
        /// What the request needs.
        wanted: &'static str,
    },
    /// Chat messages for a model without a chat template.
    #[error("model {model} has no chat template; it is served as completion only (send a prompt)")]
    NoChatTemplate {
        /// The model.
        model: String,
    },
    /// A reload found the configuration file invalid; the running configuration stays.
    #[error("the configuration was not reloaded: {message}")]
    InvalidConfig {
        /// The located error (file, line, key, what is wrong).
        message: String,
    },
    /// A field of the request is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The prompt is longer than the model's context could hold; tokenizing stopped early.
    #[error(
        "the prompt ({bytes} bytes) has more than {limit} tokens (at least {at_least}) but model {model} holds {context_tokens} (prompt plus at least one generated token must fit)"
    )]
    PromptTooLong {
        /// The model.
        model: String,
        /// The prompt's size in bytes.
        bytes: usize,
        /// The most prompt tokens the model accepts.
        limit: usize,
        /// Tokens counted before stopping (a lower bound).
        at_least: usize,
        /// The context.
        context_tokens: usize,
    },
    /// Requests being prepared hold the whole request-memory budget; this one must wait and retry.
    #[error(
        "requests being prepared hold {in_flight} of the {budget}-byte request memory budget; this one needs {needed} (retry shortly, or raise [daemon] request_memory)"
    )]
    RequestMemory {
        /// What this request needs.
        needed: u64,
        /// What is reserved now.
        in_flight: u64,
        /// The budget.
        budget: u64,
    },
    /// A bug in ultd (the detail is in its log).
    #[error("internal error: {0}")]
    Internal(String),
    /// The engine failed while running the request.
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// The request waited too long for a load or for memory.
    #[error("timed out after {waited_ms} ms waiting for {model} to load or for memory to free")]
    WaitTimeout {
        /// The model.
        model: String,
        /// How long it waited.
        waited_ms: u64,
    },
    /// The daemon is shutting down.
    #[error("ultd is shutting down")]
    ShuttingDown,
    /// The shutdown grace period ran out while this stream was still running.
    #[error("ultd is shutting down: the stream was ended after the {grace_ms} ms grace period")]
    EndedByShutdown {
        /// The grace period.
        grace_ms: u64,
    },
    /// The client named a file path instead of a configured model.
    #[error(
        "{name:?} looks like a file path: ult serves only the models configured in models.toml (by name, alias or route)"
    )]
    PathNotAllowed {
        /// What the client sent.
        name: String,
    },
    /// The client already has its maximum of concurrent requests.
    #[error(
        "client {client} already has {limit} requests running or waiting (the per-client limit)"
    )]
    TooManyRequests {
        /// The client (IP address or "unix").
        client: String,
        /// The limit.
        limit: usize,
    },
}

impl From<Rejection> for ServiceError {
    fn from(r: Rejection) -> Self {
        Self::Rejected(r)
    }
}

impl ServiceError {
    /// An invalid argument.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// A wrong-kind error.
    pub fn wrong_kind(model: &str, actual: ModelKind, wanted: &'static str) -> Self {
        Self::WrongKind {
            model: model.to_string(),
            actual: actual.as_str(),
            wanted,
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Rejected(r) => match r {
                Rejection::UnknownModel { .. } | Rejection::UnknownLease { .. } => Code::NotFound,
                Rejection::LargerThanCeiling { .. }
                | Rejection::Exhausted { .. }
                | Rejection::Pressure { .. } => Code::ResourceExhausted,
                Rejection::LoadFailed { .. } => Code::Unavailable,
                Rejection::CannotUnload {
                    reason: HoldReason::Loading,
                    ..
                } => Code::Unavailable,
                Rejection::CannotUnload { .. } => Code::FailedPrecondition,
            },
            Self::Unavailable { .. } | Self::ShuttingDown | Self::EndedByShutdown { .. } => {
                Code::Unavailable
            }
            Self::TooManyRequests { .. } | Self::RequestMemory { .. } => Code::ResourceExhausted,
            Self::PromptTooLong { .. } => Code::InvalidArgument,
            Self::Internal(_) => Code::Internal,
            Self::PathNotAllowed { .. } => Code::PermissionDenied,
            Self::WrongKind { .. } | Self::NoChatTemplate { .. } => Code::FailedPrecondition,
            Self::InvalidArgument { .. } | Self::InvalidConfig { .. } => Code::InvalidArgument,
            Self::WaitTimeout { .. } => Code::ResourceExhausted,
            Self::Engine(e) => match e {
                EngineError::ContextTooLong { .. }
                | EngineError::EmptyPrompt
                | EngineError::InvalidParameter { .. } => Code::InvalidArgument,
                EngineError::WorkerGone => Code::Unavailable,
                _ => Code::Internal,
            },
        }
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        tonic::Status::new(
            e.code(),
            ult_engine::without_backtrace(&e.to_string()).to_string(),
        )
    }
}
