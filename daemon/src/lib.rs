//! ultd: the ult daemon as a library — config, engine, memory probes, the state owner that executes the
//! policy's plans, and the gRPC server. The `ultd` binary is a thin wrapper over [`server::run`].
#![deny(missing_docs)]

pub mod alloc;
pub mod engine;
pub mod probe;
