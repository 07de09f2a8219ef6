//! Continuous batching through a real ultd over a real socket: concurrent requests to one model run in
//! one batch and give, greedily, the text each gives alone; a cancelled stream leaves the batch and frees
//! its blocks; `max_sequences` is the real limit of running sequences, with admission in arrival order.
//!
//! SmolLM2 here: its Q4_1 and Q8_0 matrices go through the same Candle kernels for one row as for many,
//! so a lone request and a batched one compute bit-identical logits and no tolerance is needed. (Gemma 3's
//! Q6_K matrices do not: see engine/tests/batching.rs, which proves batched = alone for it with every
//! step kept at two rows or more.)
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::{Duration, Instant};

use futures::StreamExt;
use ult_client::{Client, GenerateEvent};
use ult_tests::{TestDaemon, daemon_table, models_dir, start_in};

ult_tests::install_allocator!();

async fn daemon(max_sequences: u32) -> TestDaemon {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[models.smollm2]\npath = \"{}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\"\nkind = \"completion\"\ncontext = 1024\nmax_sequences = {max_sequences}\n",
        daemon_table(dir.path(), "max_requests_per_client = 64"),
        models_dir().display()
    );
    start_in(dir, &text).await
}

fn request(prompt: &str, max_tokens: u32) -> ult_client::GenerateRequest {
    ult_client::GenerateRequest {
        model: "smollm2".into(),
        prompt: prompt.into(),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Eight different prompts of mixed lengths (one over a block of 16 tokens, one over 100).
fn prompts() -> Vec<String> {
    let long =
        "The keeper climbed the tower at dusk, trimmed the wick, polished the lens and wrote the \
                weather in the log before the long night began. "
            .repeat(4);
    vec![
        "Once upon a time".into(),
        "The capital of France is".into(),
        format!("{long}Then"),
        "def fibonacci(n):".into(),
        "Here is a list of fruits: apple, banana,".into(),
        "1, 2, 3, 4, 5,".into(),
        "The lighthouse keeper wrote in his log that the storm had lasted three days and".into(),
        "Q: Why is the sky blue?\nA:".into(),
    ]
}

/// Polls status until no sequence runs or waits and every block is free (bounded).
async fn wait_until_idle(c: &mut Client) -> ult_client::ModelInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = c.status().await.unwrap();
        let m = s.model("smollm2").unwrap().clone();
        if m.running_sequences == 0 && m.waiting_sequences == 0 && m.kv_blocks_used == 0 {
            return m;
        }
        assert!(Instant::now() < deadline, "the batch never drained: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_batch_and_equal_each_alone() {
    let d = daemon(8).await;
    let mut c = d.client().await;
    let prompts = prompts();
    let n = 16;
    // Alone, one after another.
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(c.generate_text(request(p, n)).await.unwrap().0);
    }
    // Together, staggered: each starts once the previous has streamed its first text, so they arrive
    // while others are mid-decode; the third is cancelled after two deltas.
    let mut streams = Vec::new();
    for p in &prompts {
        let mut client = d.client().await;
        let mut s = client.generate(request(p, n)).await.unwrap();
        let first = match s.next().await.unwrap().unwrap() {
            GenerateEvent::Delta(t) => t,
            GenerateEvent::Done(_) => String::new(),
        };
        streams.push((client, s, first));
    }
    let mut peak_running = 0;
    let s = c.status().await.unwrap();
    peak_running = peak_running.max(s.model("smollm2").unwrap().running_sequences);
    let mut texts = Vec::new();
    for (i, (_client, mut s, mut text)) in streams.into_iter().enumerate() {
        let mut deltas = 1;
        let mut done = None;
        while let Some(ev) = s.next().await {
            match ev.unwrap() {
                GenerateEvent::Delta(t) => {
                    text.push_str(&t);
                    deltas += 1;
                    if i == 2 && deltas == 2 {
                        break;
                    }
                }
                GenerateEvent::Done(stats) => done = Some(stats),
            }
        }
        if i != 2 {
            let stats = done.unwrap();
            assert_eq!(stats.completion_tokens, n, "request {i}");
        }
        texts.push(text);
    }
    assert!(peak_running >= 2, "requests never ran together");
    for (i, (got, want)) in texts.iter().zip(&alone).enumerate() {
        if i == 2 {
            assert!(
                want.starts_with(got.as_str()),
                "cancelled request {i}: {got:?} is not a prefix of {want:?}"
            );
        } else {
            assert_eq!(got, want, "request {i}: batched text differs from alone");
        }
    }
    // The cancelled sequence left the batch and every block is free again.
    let m = wait_until_idle(&mut c).await;
    assert_eq!(m.cancelled, 1);
    assert_eq!(m.max_sequences, 8);
    assert!(m.kv_blocks_total > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_sequences_limits_the_batch_and_admission_is_fifo() {
    let d = daemon(4).await;
    let mut c = d.client().await;
    c.load("smollm2", |_, _| {}).await.unwrap();
    // Ten clients, submitted one after another (a call returns once its job is queued).
    let mut pending = Vec::new();
    for i in 0..10 {
        let mut client = d.client().await;
        let sent = Instant::now();
        let s = client
            .generate(request(&format!("Story number {i}: once upon a time"), 12))
            .await
            .unwrap();
        pending.push((client, s, sent, Instant::now()));
    }
    let watcher = {
        let mut c = d.client().await;
        tokio::spawn(async move {
            let (mut peak_running, mut peak_waiting) = (0, 0);
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                let s = c.status().await.unwrap();
                let m = s.model("smollm2").unwrap();
                peak_running = peak_running.max(m.running_sequences);
                peak_waiting = peak_waiting.max(m.waiting_sequences);
                if m.completed >= 10 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (peak_running, peak_waiting)
        })
    };
    let results = futures::future::join_all(pending.into_iter().map(
        |(_client, mut s, sent, queued)| async move {
            while let Some(ev) = s.next().await {
                if let GenerateEvent::Done(stats) = ev.unwrap() {
                    // When the request joined the running batch, on the test's clock: the server
                    // queued it between `sent` and `queued`, then it waited `queue_ms` (rounded down).
                    let wait = Duration::from_millis(stats.queue_ms);
                    let admitted = (sent + wait, queued + wait + Duration::from_millis(1));
                    return (stats, admitted);
                }
            }
            panic!("stream ended without statistics")
        },
    ))
    .await;
    let (peak_running, peak_waiting) = watcher.await.unwrap();
    assert!(peak_running <= 4, "{peak_running} sequences ran at once");
    assert!(peak_running >= 2, "the batch never held two sequences");
    assert!(peak_waiting >= 1, "nobody ever waited");
    for (i, (stats, _)) in results.iter().enumerate() {
        assert_eq!(stats.completion_tokens, 12, "request {i}");
    }
    // FIFO: a later request never joins the batch before an earlier one — never provably earlier, on
    // the test's clock, than the earliest the earlier one can have joined.
    for i in 1..results.len() {
        let (earlier, later) = (results[i - 1].1.0, results[i].1.1);
        assert!(
            later >= earlier,
            "request {i} was admitted before request {}",
            i - 1
        );
    }
    let m = wait_until_idle(&mut c).await;
    assert_eq!(m.completed, 10);
}
