//! What goes into the governor (events) and what comes out (plans of actions), as plain data.

use std::fmt;

use crate::governor::{LeaseId, RequestId, RequestKind};
use crate::pressure::{MemorySnapshot, PressureLevel};

/// Something that happened, told to [`crate::Governor::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A client asks for `model` (already routed to a configured model name).
    Request {
        /// The caller's id for this request; answered by an `Admit` or `Reject` action.
        id: RequestId,
        /// The configured model name.
        model: String,
        /// Whether the request uses the model (generate, embed) or only wants it resident (load).
        kind: RequestKind,
    },
    /// An admitted `Use` request on `model` ended (completed, failed or cancelled).
    RequestDone {
        /// The model the request used.
        model: String,
    },
    /// A request on `model` asked for its own keep-alive (Ollama's per-request `keep_alive`): once the
    /// model is next idle, it stays resident for `keep_alive` instead of its configured one (None restores
    /// the configured one). Sent just before that request's `RequestDone`.
    KeepAliveAfter {
        /// The model.
        model: String,
        /// The keep-alive from its next idle moment.
        keep_alive: Option<crate::size::KeepAlive>,
    },
    /// A request still waiting (for a load or for memory) was abandoned by its client.
    Cancel {
        /// The id it was submitted with.
        id: RequestId,
    },
    /// A load finished; `measured_bytes` is what the daemon measured it to occupy with a KV budget of
    /// `kv_tokens`.
    LoadFinished {
        /// The model loaded.
        model: String,
        /// Measured bytes (allocator or device delta) after a warm-up pass.
        measured_bytes: u64,
        /// The KV budget the load allocated, in tokens.
        kv_tokens: u32,
        /// Wall time of the load.
        load_ms: u64,
    },
    /// A load failed; the model goes to `Failed` and waiters are rejected.
    LoadFailed {
        /// The model.
        model: String,
        /// Why, in words.
        reason: String,
    },
    /// An unload finished and its memory is back.
    UnloadFinished {
        /// The model.
        model: String,
    },
    /// A resident model's memory is gone without an unload (its worker crashed). It goes to `Failed` with
    /// a backoff; requests still in flight end with `RequestDone` as usual.
    Lost {
        /// The model.
        model: String,
        /// Why, in words.
        reason: String,
    },
    /// What a resident model's prefix cache holds now: KV blocks no sequence references, kept for
    /// later requests with the same prompt prefix (a share of its KV budget, the first thing shed).
    KvCache {
        /// The model.
        model: String,
        /// Bytes of those blocks.
        cached_bytes: u64,
    },
    /// A new memory sample.
    Snapshot(MemorySnapshot),
    /// Time passed: keep-alive expiries, lease expiries.
    Tick,
}

/// One thing for the daemon to do. Actions come in the order they should be carried out.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Load `model` with a KV budget of `kv_tokens`, then report `LoadFinished` or `LoadFailed`.
    Load {
        /// The model.
        model: String,
        /// The KV budget to allocate, in tokens per sequence.
        kv_tokens: u32,
    },
    /// Unload `model`, then report `UnloadFinished`.
    Unload {
        /// The model.
        model: String,
        /// Why it goes.
        reason: EvictReason,
        /// The bytes the ledger stops charging for it.
        bytes: u64,
    },
    /// Forget the prefix cache's unreferenced blocks (busy or idle: no sequence loses anything).
    DropCache {
        /// The model.
        model: String,
        /// The bytes its cache held, as last reported.
        bytes: u64,
    },
    /// Free the KV caches an idle model keeps between requests (they are re-allocated on demand).
    DropIdleKv {
        /// The model.
        model: String,
    },
    /// Change an idle model's KV budget: later requests are limited to `tokens` of context.
    SetKvBudget {
        /// The model.
        model: String,
        /// The new budget per sequence.
        tokens: u32,
    },
    /// Let request `id` run on `model` (for `Use` requests the in-flight count already includes it).
    Admit {
        /// The request.
        id: RequestId,
        /// The model it runs on.
        model: String,
        /// True when this request waited for a load it caused.
        caused_load: bool,
    },
    /// Refuse request `id`.
    Reject {
        /// The request.
        id: RequestId,
        /// Why.
        reason: Rejection,
    },
    /// The pressure level changed (for watchers and metrics).
    PressureChanged {
        /// The new level.
        level: PressureLevel,
        /// Why, in words.
        reason: String,
    },
}

/// A list of actions; empty when nothing needs doing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// The actions, in order.
    pub actions: Vec<Action>,
}

impl Plan {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The models this plan unloads, in order.
    pub fn unloads(&self) -> impl Iterator<Item = (&str, EvictReason)> {
        self.actions.iter().filter_map(|a| match a {
            Action::Unload { model, reason, .. } => Some((model.as_str(), *reason)),
            _ => None,
        })
    }

    /// The models this plan loads, in order.
    pub fn loads(&self) -> impl Iterator<Item = &str> {
        self.actions.iter().filter_map(|a| match a {
            Action::Load { model, .. } => Some(model.as_str()),
            _ => None,
        })
    }
}

/// Why a model is unloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EvictReason {
    /// Idle longer than its keep-alive.
    KeepAlive,
    /// Evicted by score to make room for a load.
    MakeRoom,
    /// Evicted by score because memory pressure is critical.
    Pressure,
    /// Evicted to respect `max_resident`.
    MaxResident,
    /// Asked for by an operator.
    Explicit,
    /// Its configuration changed or it was removed (a reload), and no request ran on it.
    Reconfigured,
}

impl EvictReason {
    /// The reason as a stable lowercase word (used on the wire and in metrics).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::KeepAlive => "keep-alive",
            Self::MakeRoom => "make-room",
            Self::Pressure => "pressure",
            Self::MaxResident => "max-resident",
            Self::Explicit => "explicit",
            Self::Reconfigured => "reconfigured",
        }
    }
}

impl fmt::Display for EvictReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a model holds memory that cannot be freed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HoldReason {
    /// Pinned by config or by an operator.
    Pinned,
    /// Requests are in flight.
    Busy,
    /// A client holds a lease.
    Leased,
    /// It is loading.
    Loading,
    /// It is unloading (the memory comes back soon).
    Unloading,
}

impl fmt::Display for HoldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pinned => "pinned",
            Self::Busy => "busy",
            Self::Leased => "leased",
            Self::Loading => "loading",
            Self::Unloading => "unloading",
        })
    }
}

/// A model holding memory that an admission could not free, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The model.
    pub model: String,
    /// Bytes the ledger charges it.
    pub bytes: u64,
    /// Why it cannot go.
    pub reason: HoldReason,
}

/// Why a request is refused. Each maps to one gRPC status and one HTTP status in the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// No configured model, alias or route has this name.
    UnknownModel {
        /// The name asked for.
        name: String,
        /// Every configured model, alias and route name, sorted.
        known: Vec<String>,
    },
    /// The model alone is larger than the ceiling.
    LargerThanCeiling {
        /// The model.
        model: String,
        /// Bytes it needs.
        need: u64,
        /// The ceiling.
        ceiling: u64,
    },
    /// Not enough memory can be freed: every holder is pinned, busy or leased.
    Exhausted {
        /// The model that could not load.
        model: String,
        /// Bytes it needs.
        need: u64,
        /// Bytes free under the ceiling (and under the OS's available memory less headroom).
        free: u64,
        /// The models holding memory and why they stay.
        holders: Vec<Holder>,
    },
    /// Memory pressure is critical: no new loads until it eases.
    Pressure {
        /// The model that could not load.
        model: String,
        /// The pressure reason.
        reason: String,
    },
    /// The model failed to load recently; it is retried after a backoff.
    LoadFailed {
        /// The model.
        model: String,
        /// The failure.
        reason: String,
        /// Milliseconds until a request may retry the load.
        retry_in_ms: u64,
    },
    /// An explicit unload of a model that must stay.
    CannotUnload {
        /// The model.
        model: String,
        /// Why it stays.
        reason: HoldReason,
    },
    /// A lease id that does not exist (never issued, released or expired).
    UnknownLease {
        /// The id.
        lease: LeaseId,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::format_bytes as b;
        match self {
            Self::UnknownModel { name, known } => {
                write!(
                    f,
                    "unknown model {name:?}; known models: {}",
                    known.join(", ")
                )
            }
            Self::LargerThanCeiling {
                model,
                need,
                ceiling,
            } => write!(
                f,
                "model {model} needs {} ({need} bytes) but the memory ceiling is {} ({ceiling} bytes)",
                b(*need),
                b(*ceiling)
            ),
            Self::Exhausted {
                model,
                need,
                free,
                holders,
            } => {
                write!(
                    f,
                    "not enough memory to load {model}: needs {}, {} free; held by ",
                    b(*need),
                    b(*free)
                )?;
                if holders.is_empty() {
                    f.write_str("nothing ult can evict (the OS is using it)")?;
                }
                for (i, h) in holders.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{} ({}, {})", h.model, b(h.bytes), h.reason)?;
                }
                Ok(())
            }
            Self::Pressure { model, reason } => {
                write!(
                    f,
                    "memory pressure is critical ({reason}); not loading {model} now"
                )
            }
            Self::LoadFailed {
                model,
                reason,
                retry_in_ms,
            } => write!(
                f,
                "model {model} failed to load: {reason} (next attempt allowed in {:.1} s)",
                *retry_in_ms as f64 / 1000.0
            ),
            Self::CannotUnload { model, reason } => {
                write!(f, "cannot unload {model}: it is {reason}")
            }
            Self::UnknownLease { lease } => write!(f, "no lease with id {}", lease.0),
        }
    }
}
