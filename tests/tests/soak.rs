//! Thrash under load, CI-sized: 8 clients for 20 s across all three models against a ceiling that fits
//! two, on a daemon in its own process (so a crash is seen as one and its memory is the OS's number).
//! Nothing may be lost, the daemon may not crash, valid requests may fail only with documented reasons
//! (none are expected), and neither the ledger nor the measured resident bytes may pass the ceiling.
//! `scripts/soak.sh` runs the same harness longer against the ultd binary.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::Duration;

use ult_tests::soak::{SoakPlan, run, spawn_until_line};
use ult_tests::{daemon_table, model_tables};

ult_tests::install_allocator!();

/// Run as a child by `thrash_loses_nothing_and_holds_the_ceiling`: serves the models.toml it is given
/// until killed.
#[test]
fn soak_daemon_child() {
    ult_tests::serve_as_child("ULT_SOAK_CONFIG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thrash_loses_nothing_and_holds_the_ceiling() {
    // Predicted footprints come from a status of a daemon that loaded nothing.
    let probe = ult_tests::start("", "").await;
    let s = probe.client().await.status().await.unwrap();
    let p = |m: &str| s.model(m).unwrap().predicted_bytes;
    let ceiling = p("smollm2") + p("gemma3") + 10_000_000;
    probe.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("models.toml");
    let text = format!(
        "{}{}",
        daemon_table(
            dir.path(),
            &format!(
                "memory_ceiling = {ceiling}\nheadroom = 0\nmax_requests_per_client = 64\nwrite_timeout = \"5s\""
            )
        ),
        model_tables()
    );
    std::fs::write(&path, text).unwrap();
    let (mut child, addrs) = spawn_until_line(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "soak_daemon_child", "--nocapture"])
            .env("ULT_SOAK_CONFIG", &path),
        "listening ",
    )
    .unwrap();
    let mut addrs = addrs.split_whitespace().map(str::to_string);
    let addr = addrs.next().unwrap();
    let report = run(SoakPlan {
        addr,
        clients: 8,
        duration: Duration::from_secs(20),
        pid: Some(child.id()),
        seed: 7,
        attack_http: addrs.next(),
    })
    .await;
    let alive = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert!(alive, "the daemon died");
    assert_eq!(report.crashes, 0);
    assert_eq!(report.lost, 0, "{report:?}");
    assert_eq!(report.failed_valid, 0, "{report:?}");
    assert!(
        report
            .failed
            .keys()
            .all(|k| k.contains("unknown model") || k.contains("prompt longer")),
        "{report:?}"
    );
    // How many complete depends on the machine's speed and what else runs (a throughput figure belongs in
    // BENCHMARKS.md, not here); that the daemon served and thrashed does not.
    assert!(report.completed > 0, "{report:?}");
    assert!(
        report.evictions > 0,
        "the ceiling should force evictions: {report:?}"
    );
    assert!(report.max_ledger_bytes <= ceiling, "{report:?}");
    assert!(report.max_measured_resident_bytes <= ceiling, "{report:?}");
    // The attacks beside it got their documented answers and disturbed no one above.
    let a = report.attacks.as_ref().unwrap();
    assert_eq!(a.unexpected, 0, "{a:?}");
    assert!(
        a.huge_prompts > 0 && a.huge_prompts_refused == a.huge_prompts,
        "{a:?}"
    );
    assert!(a.stalled_streams > 0 && a.flood_connections > 0, "{a:?}");
}
