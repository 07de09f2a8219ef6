//! The prefix cache through ultd's gRPC front door on the real SmolLM2: two requests with the same long
//! system prompt (the second computes only its own tokens, and its greedy text equals a cold cache's),
//! status reports the cache, and memory pressure drops every cache before any KV budget shrinks while
//! requests keep being served.
//!
//! The exactness check serves with the CPU's block loops (`CandleEngine::host_loops`), which compute
//! every query row alone over its keys in position order: a row's result cannot depend on which rows
//! shared its step, so cached and cold must agree bit for bit. The portable Candle ops that serve by
//! default group their sums by the row's length and the step's shape (see engine/tests/batching.rs), so
//! there a cached prefix agrees with a cold one to float rounding, which can flip a greedy near-tie.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::Duration;

use futures::StreamExt;
use ult_client::{Client, GenerateRequest, WatchItem};
use ult_engine::CandleEngine;
use ult_tests::{daemon_table, model_tables, models_dir, start_in, start_with};

ult_tests::install_allocator!();

/// About 1,500 tokens of system prompt.
fn system_prompt() -> String {
    let rule = "Answer briefly and truthfully, name your sources when you can, never invent a fact, \
                and say so plainly when you do not know something.";
    (0..48)
        .map(|i| format!("Rule {i}: {rule}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ask(model: &str, question: &str) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        messages: vec![
            ("system".into(), system_prompt()),
            ("user".into(), question.into()),
        ],
        max_tokens: Some(16),
        ..Default::default()
    }
}

/// The same SmolLM2 file twice: with the prefix cache (the default) and without (the cold reference).
fn cold_twin() -> String {
    format!(
        "\n[models.smollm2-cold]\npath = \"{}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\"\nkind = \"chat\"\ncontext = 2048\nprefix_cache = false\n",
        models_dir().display()
    )
}

async fn generate(c: &mut Client, r: GenerateRequest) -> (String, ult_client::GenerateStats) {
    c.generate_text(r).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_system_prompt_is_computed_once_and_gives_the_cold_text() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}{}{}",
        daemon_table(dir.path(), ""),
        model_tables(),
        cold_twin()
    );
    let d = start_with(dir, &text, CandleEngine::host_loops("cpu").unwrap()).await;
    let mut c = d.client().await;
    let (_, first) = generate(&mut c, ask("smollm2", "What is a lighthouse?")).await;
    assert!(first.prompt_tokens > 1400, "{first:?}");
    assert_eq!(first.cached_tokens, 0);
    let (warm, second) = generate(&mut c, ask("smollm2", "Who keeps the lamp lit?")).await;
    // Only the question and the template around it are computed: the system prompt comes from the
    // cache, to the first token that differs.
    let own = second.prompt_tokens - second.cached_tokens;
    assert!(second.cached_tokens > 1400, "{second:?}");
    assert!(
        own < 48,
        "computed {own} of {} prompt tokens",
        second.prompt_tokens
    );
    let (cold, stats) = generate(&mut c, ask("smollm2-cold", "Who keeps the lamp lit?")).await;
    assert_eq!(stats.cached_tokens, 0);
    assert_eq!(
        warm, cold,
        "served from the cache, the text differs from a cold run"
    );
    // Status reports the cache per model.
    let s = c.status().await.unwrap();
    let m = s.model("smollm2").unwrap();
    assert!(m.prefix_cache);
    assert_eq!(
        (m.prefix_cache_hits, m.prefix_cache_misses),
        (1, 1),
        "{m:?}"
    );
    assert_eq!(m.prefix_cached_tokens, u64::from(second.cached_tokens));
    assert!(m.kv_cached_blocks > 0 && m.kv_cached_bytes > 0, "{m:?}");
    let cold_status = s.model("smollm2-cold").unwrap();
    assert!(!cold_status.prefix_cache);
    assert_eq!(cold_status.kv_cached_blocks, 0);
}

async fn next_events(
    watch: &mut futures::stream::BoxStream<'static, Result<WatchItem, ult_client::ClientError>>,
    until: &str,
) -> Vec<WatchItem> {
    let mut events = Vec::new();
    while !events.iter().any(|e: &WatchItem| e.kind == until) {
        let item = tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();
        events.push(item);
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pressure_empties_the_cache_before_any_budget_shrinks_and_requests_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("snapshot.json");
    // Plenty of bytes available; pressure comes from the kernel's stall figure (PSI), so the governor
    // sheds without a byte deficit: no model needs to go.
    let snapshot = |psi: f64| ult_tests::probe_snapshot(32.0, psi);
    std::fs::write(&probe, snapshot(0.0)).unwrap();
    let daemon = ult_tests::file_probe_daemon(&probe);
    let text = format!("{}{}", daemon_table(dir.path(), &daemon), model_tables());
    let d = start_in(dir, &text).await;
    let mut c = d.client().await;
    generate(&mut c, ask("smollm2", "What is a lighthouse?")).await;
    // The worker publishes the cache's share (the governor reads it with each probe sample).
    let mut watch = c.watch().await.unwrap();
    let mut shown = false;
    for _ in 0..100 {
        let s = c.status().await.unwrap();
        if s.model("smollm2").unwrap().kv_cached_bytes > 0 {
            shown = true;
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), watch.next()).await;
    }
    assert!(shown, "the cache never showed in status");
    // Warning: memory stalls, no byte deficit.
    std::fs::write(&probe, snapshot(50.0)).unwrap();
    let events = next_events(&mut watch, "kv-budget").await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let dropped = kinds
        .iter()
        .position(|k| *k == "cache-dropped")
        .unwrap_or_else(|| panic!("no cache-dropped event: {events:?}"));
    let shrunk = kinds.iter().position(|k| *k == "kv-budget").unwrap();
    assert!(dropped < shrunk, "{events:?}");
    assert_eq!(events[dropped].model.as_deref(), Some("smollm2"));
    assert!(!kinds.contains(&"evicted"), "{events:?}");
    // Requests are still served (within the shrunk budget).
    let (_, short) = generate(&mut c, ult_tests::paris_request("smollm2")).await;
    assert!(short.completion_tokens > 0);
    // Back to normal, the budget comes back, and the long prompt is computed again: the cache was
    // emptied. (It may reuse the few template tokens it shares with the short request served since,
    // never a whole block.)
    std::fs::write(&probe, snapshot(0.0)).unwrap();
    let restored = next_events(&mut watch, "kv-budget").await;
    assert!(
        restored.iter().any(|e| e.kind == "kv-budget"),
        "{restored:?}"
    );
    let (_, again) = generate(&mut c, ask("smollm2", "What is a lighthouse?")).await;
    assert!(again.cached_tokens < 16, "{again:?}");
}
