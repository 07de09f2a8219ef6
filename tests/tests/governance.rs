//! Memory governance with the real models on a real ultd: a ceiling that fits two of three models evicts
//! the right one by score (never a pinned or busy one), keep-alive expiry, pins restored after a restart,
//! pressure shedding in the documented order from an injected snapshot source, and a ceiling smaller than
//! a model. Every step checks that the measured bytes of resident models stay under the ceiling.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::Duration;

use futures::StreamExt;
use ult_client::{Client, GenerateRequest, ModelState, StatusReport, WatchItem};
use ult_tests::{
    TestDaemon, completion, daemon_table, model_tables, paris_request, start, start_in,
};

ult_tests::install_allocator!();

/// Predicted footprints of the three models, read from a daemon's status (headers only, no loads).
async fn predicted() -> (u64, u64, u64) {
    let d = start("", "").await;
    let s = d.client().await.status().await.unwrap();
    let p = |m: &str| s.model(m).unwrap().predicted_bytes;
    let out = (p("smollm2"), p("gemma3"), p("minilm"));
    d.stop().await;
    out
}

/// The invariant, as measured: what the resident models measured and what the ledger charges both stay
/// under the ceiling.
fn assert_under_ceiling(s: &StatusReport) {
    let measured = s.measured_resident_bytes();
    assert!(
        measured <= s.daemon.ceiling_bytes,
        "measured {measured} > ceiling {}",
        s.daemon.ceiling_bytes
    );
    assert!(
        s.daemon.used_bytes <= s.daemon.ceiling_bytes,
        "ledger {} > ceiling {}",
        s.daemon.used_bytes,
        s.daemon.ceiling_bytes
    );
}

/// Waits, without sleeping, until `cond` holds on the status: re-checks on every watch event, and at least
/// every 250 ms.
async fn wait_for(
    c: &mut Client,
    what: &str,
    cond: impl Fn(&StatusReport) -> bool,
) -> StatusReport {
    let mut watch = c.watch().await.unwrap();
    for _ in 0..400 {
        let s = c.status().await.unwrap();
        if cond(&s) {
            return s;
        }
        let _ = tokio::time::timeout(Duration::from_millis(250), watch.next()).await;
    }
    panic!("timed out waiting for {what}");
}

async fn evictions(
    watch: &mut (impl futures::Stream<Item = Result<WatchItem, ult_client::ClientError>> + Unpin),
    n: usize,
) -> Vec<WatchItem> {
    let mut out = Vec::new();
    while out.len() < n {
        let item = tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();
        if item.kind == "evicted" {
            out.push(item);
        }
    }
    out
}

/// A daemon where any two of the three models fit and all three do not. Its memory probe reads a calm
/// recorded sample (48 of 64 GiB available, no stalls), so what other tests running beside it do to this
/// machine's memory cannot shed a model: the evictions are the policy's choice alone. The directory holds
/// the sample.
async fn two_of_three(extra: &str) -> (TestDaemon, tempfile::TempDir) {
    let (s, g, _) = predicted().await;
    // Any two fit (minilm is the smallest), all three do not — and the shortfall (minilm less 10 MB) is
    // more than shrinking idle KV budgets can free, so a model must go.
    let ceiling = s + g + 10_000_000;
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = probe_dir.path().join("probe.json");
    std::fs::write(&probe, ult_tests::probe_snapshot(48.0, 0.0)).unwrap();
    let d = start(
        &format!(
            "memory_ceiling = {ceiling}\nheadroom = 0\n{extra}\n[daemon.probe]\nsource = \"file\"\npath = \"{}\"\n",
            probe.display()
        ),
        "",
    )
    .await;
    (d, probe_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_third_model_evicts_the_cheapest_by_score() {
    let (d, _probe) = two_of_three("").await;
    let mut c = d.client().await;
    let mut watch = c.watch().await.unwrap();
    // smollm2 is used three times, minilm once: evicting minilm risks less reload.
    for _ in 0..3 {
        c.generate_text(completion("smollm2", "Hello", 2))
            .await
            .unwrap();
    }
    c.embed("minilm", vec!["a cat".into()]).await.unwrap();
    assert_under_ceiling(&c.status().await.unwrap());
    let (text, stats) = c
        .generate_text(completion("gemma3", "The capital of France is", 8))
        .await
        .unwrap();
    assert!(text.contains("France"), "{text}");
    assert!(stats.load_ms.is_some());
    let evicted = evictions(&mut watch, 1).await;
    assert_eq!(evicted[0].model.as_deref(), Some("minilm"));
    assert!(
        evicted[0].detail.starts_with("make-room"),
        "{:?}",
        evicted[0]
    );
    let s = c.status().await.unwrap();
    assert_eq!(s.model("smollm2").unwrap().state, ModelState::Resident);
    assert_eq!(s.model("gemma3").unwrap().state, ModelState::Resident);
    assert_eq!(s.model("minilm").unwrap().state, ModelState::Unloaded);
    assert_under_ceiling(&s);
    // The heap holds what the ledger says, not three models.
    let resident_measured: u64 = s
        .models
        .iter()
        .filter_map(|m| (m.state == ModelState::Resident).then_some(m.measured_bytes.unwrap()))
        .sum();
    assert!(
        ultd::alloc::live_bytes() < (s.daemon.ceiling_bytes + 150_000_000) as i64,
        "heap {}",
        ultd::alloc::live_bytes()
    );
    assert!(resident_measured > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_model_survives_and_the_next_cheapest_goes() {
    let (d, _probe) = two_of_three("").await;
    let mut c = d.client().await;
    let mut watch = c.watch().await.unwrap();
    c.pin("minilm").await.unwrap();
    c.generate_text(completion("smollm2", "Hello", 2))
        .await
        .unwrap();
    wait_for(&mut c, "minilm resident", |s| {
        s.model("minilm").unwrap().state == ModelState::Resident
    })
    .await;
    // minilm would be cheaper to evict, but it is pinned: smollm2 goes.
    c.generate_text(completion("gemma3", "Hello", 2))
        .await
        .unwrap();
    let evicted = evictions(&mut watch, 1).await;
    assert_eq!(evicted[0].model.as_deref(), Some("smollm2"));
    let s = c.status().await.unwrap();
    assert!(s.model("minilm").unwrap().pinned);
    assert_eq!(s.model("minilm").unwrap().state, ModelState::Resident);
    assert_under_ceiling(&s);
    // Unpinned, it is evictable again.
    c.unpin("minilm").await.unwrap();
    assert!(!c.status().await.unwrap().model("minilm").unwrap().pinned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leased_model_survives_until_released() {
    let (d, _probe) = two_of_three("").await;
    let mut c = d.client().await;
    let mut watch = c.watch().await.unwrap();
    let lease = c
        .lease("minilm", Some(Duration::from_secs(600)))
        .await
        .unwrap();
    c.generate_text(completion("smollm2", "Hello", 2))
        .await
        .unwrap();
    wait_for(&mut c, "minilm resident", |s| {
        s.model("minilm").unwrap().state == ModelState::Resident
    })
    .await;
    assert_eq!(c.status().await.unwrap().model("minilm").unwrap().leases, 1);
    // minilm is the cheapest to evict, but leased: smollm2 goes for gemma3.
    c.generate_text(completion("gemma3", "Hello", 2))
        .await
        .unwrap();
    assert_eq!(
        evictions(&mut watch, 1).await[0].model.as_deref(),
        Some("smollm2")
    );
    assert!(c.release(lease.lease_id).await.unwrap());
    assert!(
        !c.release(lease.lease_id).await.unwrap(),
        "a lease is released once"
    );
    // Released, minilm is the one to go for smollm2.
    c.generate_text(completion("smollm2", "Hello", 2))
        .await
        .unwrap();
    assert_eq!(
        evictions(&mut watch, 1).await[0].model.as_deref(),
        Some("minilm")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_mid_generation_is_never_evicted() {
    let (d, _probe) = two_of_three("").await;
    let mut c = d.client().await;
    let mut watch = c.watch().await.unwrap();
    // minilm is popular, smollm2 used once: by score smollm2 would go — but it is generating.
    for _ in 0..4 {
        c.embed("minilm", vec!["a cat".into()]).await.unwrap();
    }
    c.load("smollm2", |_, _| {}).await.unwrap();
    let mut long = c.clone();
    let busy = tokio::spawn(async move {
        long.generate_text(GenerateRequest {
            ignore_eos: true,
            ..completion("smollm2", "Once upon a time", 120)
        })
        .await
    });
    wait_for(&mut c, "smollm2 busy", |s| {
        s.model("smollm2").unwrap().in_flight == 1
    })
    .await;
    let (text, _) = c
        .generate_text(completion("gemma3", "The capital of France is", 4))
        .await
        .unwrap();
    assert!(!text.is_empty());
    let evicted = evictions(&mut watch, 1).await;
    assert_eq!(
        evicted[0].model.as_deref(),
        Some("minilm"),
        "the busy model stayed"
    );
    let (story, stats) = busy.await.unwrap().unwrap();
    assert_eq!(stats.completion_tokens, 120, "{story}");
    assert_under_ceiling(&c.status().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_expiry_unloads_an_idle_model() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}{}",
        daemon_table(dir.path(), ""),
        model_tables().replace("context = 256\n", "context = 256\nkeep_alive = \"1s\"\n")
    );
    let d = start_in(dir, &text).await;
    let mut c = d.client().await;
    let mut watch = c.watch().await.unwrap();
    c.embed("minilm", vec!["a cat".into()]).await.unwrap();
    let evicted = evictions(&mut watch, 1).await;
    assert_eq!(evicted[0].model.as_deref(), Some("minilm"));
    assert!(
        evicted[0].detail.starts_with("keep-alive"),
        "{:?}",
        evicted[0]
    );
    wait_for(&mut c, "minilm unloaded", |s| {
        s.model("minilm").unwrap().state == ModelState::Unloaded
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_and_explicit_loads_survive_a_restart() {
    let d = start("", "").await;
    let mut c = d.client().await;
    c.pin("minilm").await.unwrap();
    c.load("smol", |_, _| {}).await.unwrap();
    let dir = d.stop().await;
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
    assert_eq!(state["pinned"], serde_json::json!(["minilm"]));
    assert_eq!(state["loaded"], serde_json::json!(["smollm2"]));
    // A new daemon on the same state file restores both, pinned and loaded.
    let text = std::fs::read_to_string(dir.path().join("models.toml")).unwrap();
    let d = start_in(dir, &text).await;
    let mut c = d.client().await;
    let s = wait_for(&mut c, "restored models resident", |s| {
        s.model("minilm").unwrap().state == ModelState::Resident
            && s.model("smollm2").unwrap().state == ModelState::Resident
    })
    .await;
    assert!(s.model("minilm").unwrap().pinned);
    assert!(!s.model("smollm2").unwrap().pinned);
    assert_eq!(s.model("gemma3").unwrap().state, ModelState::Unloaded);
}

/// The next watch event (failing after 60 s).
async fn next_event(
    watch: &mut (impl futures::Stream<Item = Result<WatchItem, ult_client::ClientError>> + Unpin),
) -> WatchItem {
    tokio::time::timeout(Duration::from_secs(60), watch.next())
        .await
        .expect("an event")
        .unwrap()
        .unwrap()
}

/// Pressure sheds in the documented order. The order models go in follows their eviction scores, which
/// include measured load times (the reload cost), so the test does not presume it from the use counts —
/// on a loaded machine a slow load can outweigh a use. It reads the scores from Status once the
/// warning's shedding has settled every model's charge, and checks that models are evicted in ascending
/// score.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pressure_sheds_caches_then_budgets_then_models_by_score() {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("snapshot.json");
    let snapshot = ult_tests::probe_snapshot;
    std::fs::write(&probe, snapshot(32.0, 0.0)).unwrap();
    // A short dwell: leaving a pressure level waits for it (entering does not).
    let daemon = format!(
        "pressure_dwell = \"300ms\"\n{}",
        ult_tests::file_probe_daemon(&probe)
    );
    let text = format!("{}{}", daemon_table(dir.path(), &daemon), model_tables());
    let d = start_in(dir, &text).await;
    let mut c = d.client().await;
    for _ in 0..3 {
        c.generate_text(completion("gemma3", "Hi", 2))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        c.generate_text(paris_request("smollm2")).await.unwrap();
    }
    c.embed("minilm", vec!["x".into()]).await.unwrap();
    let mut watch = c.watch().await.unwrap();
    // Warning from PSI with memory to spare: caches are dropped and KV budgets shrink; nothing is
    // evicted.
    std::fs::write(&probe, snapshot(32.0, 30.0)).unwrap();
    let mut events = Vec::new();
    loop {
        let item = next_event(&mut watch).await;
        let kind = item.kind.clone();
        events.push(item);
        if kind == "kv-budget" {
            break;
        }
    }
    assert_eq!(events[0].kind, "pressure", "{events:?}");
    assert!(events[0].detail.starts_with("warning"), "{events:?}");
    assert!(events.iter().all(|e| e.kind != "evicted"), "{events:?}");
    // The shedding is one plan, carried out before Status is answered: these are the scores the
    // eviction will compare (a score's decay is the same factor for every model, so their order holds).
    let s = c.status().await.unwrap();
    assert_eq!(s.daemon.pressure, "warning");
    let mut by_score: Vec<(f64, String)> = ["gemma3", "smollm2", "minilm"]
        .iter()
        .map(|m| (s.model(m).unwrap().score, m.to_string()))
        .collect();
    by_score.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        by_score.windows(2).all(|w| w[0].0 < w[1].0),
        "distinct scores: {by_score:?}"
    );
    // Critical: 1 GiB available, under half the 4 GiB headroom. Every idle model goes (together they
    // free less than the 3 GiB deficit), lowest score first.
    std::fs::write(&probe, snapshot(1.0, 30.0)).unwrap();
    let mut critical = Vec::new();
    while critical
        .iter()
        .filter(|e: &&WatchItem| e.kind == "evicted")
        .count()
        < 3
    {
        critical.push(next_event(&mut watch).await);
    }
    let kinds: Vec<&str> = critical.iter().map(|e| e.kind.as_str()).collect();
    let first_evict = kinds.iter().position(|k| *k == "evicted").unwrap();
    let pressure = kinds
        .iter()
        .position(|k| *k == "pressure")
        .expect("a level change");
    assert!(pressure < first_evict, "{critical:?}");
    assert!(
        critical[pressure].detail.starts_with("critical"),
        "{critical:?}"
    );
    // Budgets shrank under the warning, before any eviction (the rest of the warning's plan may come
    // after the first budget event).
    let last_kv = kinds.iter().rposition(|k| *k == "kv-budget");
    assert!(last_kv.is_none_or(|i| i < first_evict), "{critical:?}");
    let order: Vec<&str> = critical
        .iter()
        .filter(|e| e.kind == "evicted")
        .map(|e| e.model.as_deref().unwrap())
        .collect();
    let expected: Vec<&str> = by_score.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(order, expected, "scores {by_score:?}; events {critical:?}");
    assert!(
        critical
            .iter()
            .filter(|e| e.kind == "evicted")
            .all(|e| e.detail.starts_with("pressure"))
    );
    // While critical, loads are refused with the reason.
    let e = c
        .generate_text(completion("gemma3", "Hi", 2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("pressure is critical"), "{e}");
    // Back to normal after the dwell, loads resume.
    std::fs::write(&probe, snapshot(32.0, 0.0)).unwrap();
    wait_for(&mut c, "pressure normal", |s| s.daemon.pressure == "normal").await;
    c.generate_text(completion("gemma3", "Hi", 2))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ceiling_smaller_than_a_model_is_refused_with_both_numbers() {
    let d = start("memory_ceiling = \"150MiB\"\nheadroom = 0\n", "").await;
    let mut c = d.client().await;
    let e = c
        .generate_text(completion("gemma3", "Hi", 2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::ResourceExhausted));
    let text = e.to_string();
    assert!(
        text.contains("model gemma3 needs")
            && text.contains("memory ceiling is 150 MiB (157286400 bytes)"),
        "{text}"
    );
    // Smaller models still load under the same ceiling.
    let embedded = c.embed("minilm", vec!["fits".into()]).await.unwrap();
    assert_eq!(embedded.embeddings.len(), 1);
    let plan = c.plan_load("gemma3").await.unwrap();
    assert!(!plan.fits && plan.refusal.unwrap().contains("memory ceiling"));
}
