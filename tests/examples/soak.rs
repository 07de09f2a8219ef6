//! The soak harness, long (what `scripts/soak.sh` runs; the CI-sized run is `tests/tests/soak.rs`): starts
//! the ultd binary on the three real models with a ceiling that fits SmolLM2 and Gemma 3 but not all three,
//! drives it with many concurrent clients, and prints the report as JSON.
//!
//! `soak --ultd target/release/ultd --clients 16 --seconds 600 [--seed 7]`
//! `soak --addr 127.0.0.1:50051 [--pid PID] [--http ADDR] ...` soaks a daemon that is already running.
//! `--attacks` adds the attackers of `ult_tests::soak::AttackReport` (huge prompts, streams never read,
//! connection floods) and times Status throughout.
//!
//! Exits 1 if anything was lost, the daemon crashed, a valid request failed, or the ledger or the
//! measured resident bytes passed the ceiling.
#![allow(clippy::unwrap_used)] // a benchmark may unwrap

#[path = "../../daemon/examples/common/mod.rs"]
mod common;
use common::arg_opt as arg;

use std::process::{Child, Command};
use std::time::Duration;

use ult_tests::soak::{SoakPlan, run, spawn_until_line};
use ult_tests::{daemon_table, model_tables};

/// Starts `ultd` on `toml`; returns the child, its gRPC address and its HTTP address.
fn start(ultd: &str, dir: &std::path::Path, toml: &str) -> (Child, String, Option<String>) {
    let path = dir.join("models.toml");
    std::fs::write(&path, toml).unwrap();
    let (child, rest) = spawn_until_line(
        Command::new(ultd).arg("--config").arg(&path),
        "ultd listening on ",
    )
    .unwrap();
    // "ADDR (unix socket PATH, http ADDR, device …)"
    let http = rest
        .split(", ")
        .find_map(|p| p.strip_prefix("http "))
        .filter(|a| *a != "-")
        .map(str::to_string);
    (
        child,
        rest.split_whitespace().next().unwrap().to_string(),
        http,
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = tempfile::tempdir().unwrap();
    let mut child = None;
    let (addr, pid, http) = match (arg(&args, "--addr"), arg(&args, "--ultd")) {
        (Some(addr), _) => (
            addr,
            arg(&args, "--pid").map(|v| v.parse().unwrap()),
            arg(&args, "--http"),
        ),
        (None, Some(ultd)) => {
            // The predictions come from a daemon that loads nothing.
            let (mut probe, addr, _) = start(
                &ultd,
                dir.path(),
                &(daemon_table(dir.path(), "") + &model_tables()),
            );
            let status = ult_client::Client::connect(&addr)
                .await
                .unwrap()
                .status()
                .await
                .unwrap();
            let p = |m: &str| status.model(m).unwrap().predicted_bytes;
            let ceiling = p("smollm2") + p("gemma3") + 10_000_000;
            probe.kill().unwrap();
            probe.wait().unwrap();
            let extra = format!(
                "memory_ceiling = {ceiling}\nheadroom = 0\nmax_requests_per_client = 64\nwrite_timeout = \"5s\""
            );
            let (c, addr, http) = start(
                &ultd,
                dir.path(),
                &(daemon_table(dir.path(), &extra) + &model_tables()),
            );
            let pid = c.id();
            child = Some(c);
            (addr, Some(pid), http)
        }
        (None, None) => panic!("give --ultd PATH or --addr HOST:PORT"),
    };
    let plan = SoakPlan {
        addr,
        clients: arg(&args, "--clients").map_or(16, |v| v.parse().unwrap()),
        duration: Duration::from_secs(arg(&args, "--seconds").map_or(600, |v| v.parse().unwrap())),
        pid,
        seed: arg(&args, "--seed").map_or(7, |v| v.parse().unwrap()),
        attack_http: if args.iter().any(|a| a == "--attacks") {
            Some(http.expect("--attacks needs the daemon's HTTP address (--http ADDR)"))
        } else {
            None
        },
    };
    eprintln!(
        "soak: {} clients for {:?} against {} ({} cores)",
        plan.clients,
        plan.duration,
        plan.addr,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let report = run(plan).await;
    let alive = child
        .as_mut()
        .is_none_or(|c| c.try_wait().unwrap().is_none());
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    let ok = alive
        && report.lost == 0
        && report.crashes == 0
        && report.failed_valid == 0
        && report.max_ledger_bytes <= report.ceiling_bytes
        && report.max_measured_resident_bytes <= report.ceiling_bytes
        && report
            .attacks
            .as_ref()
            .is_none_or(|a| a.unexpected == 0 && a.huge_prompts_refused == a.huge_prompts);
    std::process::exit(if ok { 0 } else { 1 });
}
