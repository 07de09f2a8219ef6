//! The soak harness against a running ultd (what `scripts/soak.sh` runs for minutes; the CI-sized run is
//! `tests/tests/soak.rs`): many concurrent clients across every model, then the report as JSON.
//!
//! `soak --addr 127.0.0.1:50051 --pid PID --clients 16 --seconds 600 [--seed 7]`
//!
//! Exits 1 if anything was lost, the daemon crashed, a valid request failed, or the ledger or the
//! measured resident bytes passed the ceiling.
#![allow(clippy::unwrap_used)] // a benchmark may unwrap

use std::time::Duration;

use ult_tests::soak::{SoakPlan, run};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let plan = SoakPlan {
        addr: arg(&args, "--addr").unwrap_or_else(|| "127.0.0.1:50051".into()),
        clients: arg(&args, "--clients").map_or(16, |v| v.parse().unwrap()),
        duration: Duration::from_secs(arg(&args, "--seconds").map_or(600, |v| v.parse().unwrap())),
        pid: arg(&args, "--pid").map(|v| v.parse().unwrap()),
        seed: arg(&args, "--seed").map_or(7, |v| v.parse().unwrap()),
    };
    let report = run(plan).await;
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    let ok = report.lost == 0
        && report.crashes == 0
        && report.failed_valid == 0
        && report.max_ledger_bytes <= report.ceiling_bytes
        && report.max_measured_resident_bytes <= report.ceiling_bytes;
    std::process::exit(if ok { 0 } else { 1 });
}
