//! ult-policy: the decision core of ult — footprints, the memory ledger, pressure levels, admission,
//! cost-aware eviction, keep-alive, leases and routing — as a deterministic state machine without IO.
//!
//! The daemon feeds [`Governor::handle`] an [`Event`] and the current time in milliseconds and gets back a
//! [`Plan`]: a list of [`Action`]s (load this, unload that with a reason, admit or reject this request) to
//! carry out. The governor never reads a clock, never blocks, never allocates memory it is told about, and
//! never panics on any input. Decisions iterate ordered maps with explicit tie-breaks, so the same events
//! give the same plans.
#![deny(missing_docs)]

mod footprint;
mod governor;
mod plan;
mod pressure;
mod route;
mod score;
pub mod sim;

mod size;

pub use footprint::Footprint;
pub use governor::{
    Backoff, Governor, GovernorConfig, LeaseId, LoadPreview, ModelChange, ModelSpec, ModelView,
    PlannedVictim, RequestId, RequestKind, Residency,
};
pub use plan::{Action, Event, EvictReason, HoldReason, Holder, Plan, Rejection};
pub use pressure::{
    LevelChange, MemorySnapshot, MetalView, OsPressure, PoolSource, PressureLevel,
    PressureThresholds, PressureTracker, Verdict,
};
pub use route::{Route, RouteStrategy, Router, RouterError};
pub use score::Gdsf;
pub use size::{KeepAlive, SizeError, SizeSpec, format_bytes, parse_duration_ms, parse_size};
