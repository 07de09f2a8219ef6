//! ultd: the ult daemon as a library — config, engine, memory probes, the state owner that executes the
//! policy's plans, and the gRPC server. The `ultd` binary is a thin wrapper over [`server::spawn`].
#![deny(missing_docs)]

pub mod alloc;
pub mod auth;
pub mod config;
pub mod conn;
pub mod discover;
pub mod error;
pub mod fuzzing;
pub mod generation;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod probe;
pub mod registry;
pub mod requests;
pub mod server;
pub mod service;
pub mod state_file;
pub mod supervisor;
pub mod tools;
pub mod worker;
