//! Reliability and security on a real ultd: graceful shutdown with a deadline, a load that fails half way
//! leaving no memory behind and retrying only after its backoff, bearer tokens, request-size and
//! per-client limits, and a state file that survives being killed at random.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::{Duration, Instant};

use futures::StreamExt;
use ult_client::{Client, GenerateEvent, GenerateRequest, ModelState};
use ult_tests::{daemon_table, model_tables, start, start_in};

ult_tests::install_allocator!();

fn long(model: &str, tokens: u32) -> GenerateRequest {
    GenerateRequest {
        ignore_eos: true,
        ..ult_tests::completion(model, "Once upon a time", tokens)
    }
}

async fn until(c: &mut Client, what: &str, cond: impl Fn(&ult_client::StatusReport) -> bool) {
    for _ in 0..4000 {
        if cond(&c.status().await.unwrap()) {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_short_streams_finish_and_ends_long_ones_after_the_grace() {
    // Neither side of the rule may hinge on this machine's speed: the short stream is 4 tokens against a
    // 10 s grace (2.5 tokens/s would do), the long one 8,000 tokens on SmolLM2's full 8k context, which
    // would need 800 tokens/s on this CPU to finish inside the grace.
    let long_table = format!(
        "\n[models.smollm2-8k]\npath = \"{}\"\nkind = \"completion\"\ncontext = 8192\n",
        ult_tests::models_dir()
            .join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            .display()
    );
    let d = start("shutdown_grace = \"10s\"\n", &long_table).await;
    let mut c = d.client().await;
    c.load("gemma3", |_, _| {}).await.unwrap();
    c.load("smollm2-8k", |_, _| {}).await.unwrap();
    let mut short_client = c.clone();
    let mut long_client = c.clone();
    // Short, on its own model so that it does not queue behind the long one.
    let short = tokio::spawn(async move { short_client.generate_text(long("gemma3", 4)).await });
    let long_stream = tokio::spawn(async move {
        let mut s = long_client
            .generate(long("smollm2-8k", 8000))
            .await
            .unwrap();
        let mut tokens = 0;
        while let Some(event) = s.next().await {
            match event {
                Ok(GenerateEvent::Delta(_)) => tokens += 1,
                Ok(GenerateEvent::Done(_)) => return (tokens, None),
                Err(e) => return (tokens, Some(e)),
            }
        }
        (tokens, None)
    });
    until(&mut c, "both requests in flight", |s| {
        s.model("gemma3").unwrap().in_flight == 1 && s.model("smollm2-8k").unwrap().in_flight == 1
    })
    .await;
    let started = Instant::now();
    d.running.stop().await;
    let (text, stats) = short
        .await
        .unwrap()
        .expect("the short stream finishes normally");
    assert_eq!(stats.completion_tokens, 4, "{text}");
    let (tokens, error) = long_stream.await.unwrap();
    let error = error.expect("the long stream is ended");
    assert_eq!(error.code(), Some(tonic::Code::Unavailable), "{error}");
    assert!(error.to_string().contains("grace period"), "{error}");
    assert!(tokens < 8000, "{tokens}");
    // Stop waited for the grace (plus its 5 s for connections to close), not for the 8,000 tokens.
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_fails_half_way_leaves_no_memory_and_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    // SmolLM2 with its last layer's FFN down projection renamed: the header and tokenizer are valid (the
    // model inspects fine at boot), but the load fails after reading almost every weight.
    let mut bytes =
        std::fs::read(ult_tests::models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
            .unwrap();
    let needle = b"blk.29.ffn_down.weight";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + needle.len() - 8] = b'X';
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, &bytes).unwrap();
    drop(bytes);
    let more = format!(
        "\n[models.broken]\npath = \"{}\"\nkind = \"chat\"\ncontext = 2048\n",
        broken.display()
    );
    let text = format!("{}{}{more}", daemon_table(dir.path(), ""), model_tables());
    let d = start_in(dir, &text).await;
    let mut c = d.client().await;
    assert_eq!(
        c.status().await.unwrap().model("broken").unwrap().state,
        ModelState::Unloaded,
        "inspects fine"
    );
    let mut watch = c.watch().await.unwrap();
    let before = ultd::alloc::live_bytes();
    let e = c.generate_text(long("broken", 4)).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
    assert!(
        e.to_string()
            .contains("lacks tensor blk.29.ffn_down.weight"),
        "{e}"
    );
    let after = ultd::alloc::live_bytes();
    assert!(
        after - before < 8_000_000,
        "{} bytes left behind by the failed load",
        after - before
    );
    let s = c.status().await.unwrap();
    let m = s.model("broken").unwrap();
    assert_eq!(m.state, ModelState::Failed);
    assert!(m.failure.as_deref().unwrap().contains("lacks tensor"));
    assert_eq!(s.daemon.used_bytes, 0, "nothing charged");
    // Inside the backoff (1 s after the first failure): refused at once, no new load.
    let e = c.generate_text(long("broken", 4)).await.unwrap_err();
    assert!(e.to_string().contains("next attempt allowed in"), "{e}");
    // The other models serve meanwhile.
    assert!(
        !c.generate_text(long("smollm2", 2))
            .await
            .unwrap()
            .0
            .is_empty()
    );
    let mut loading = 0;
    while let Ok(Some(Ok(item))) =
        tokio::time::timeout(Duration::from_millis(100), watch.next()).await
    {
        if item.kind == "loading" && item.model.as_deref() == Some("broken") {
            loading += 1;
        }
    }
    assert_eq!(loading, 1, "one attempt, not a hot loop");
    // After the backoff, one more attempt, and the next delay doubles.
    until(&mut c, "the backoff to pass", |_| true).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = c.generate_text(long("broken", 4)).await.unwrap_err();
            if e.to_string().contains("lacks tensor") && e.to_string().contains("2.0 s") {
                break;
            }
            assert!(e.to_string().contains("next attempt allowed in"), "{e}");
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a second attempt after the first backoff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_required_and_refusals_counted() {
    let token = "a-long-enough-secret-token";
    let d = start(&format!("auth_token = \"{token}\"\n"), "").await;
    let anonymous = Client::connect(&d.addr).await.unwrap();
    let e = anonymous.clone().status().await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unauthenticated), "{e}");
    let wrong = Client::connect_with_token(&d.addr, Some("not-the-right-token-at-all"))
        .await
        .unwrap();
    assert_eq!(
        wrong.clone().status().await.unwrap_err().code(),
        Some(tonic::Code::Unauthenticated)
    );
    let mut good = Client::connect_with_token(&d.addr, Some(token))
        .await
        .unwrap();
    assert_eq!(good.status().await.unwrap().models.len(), 3);
    let http = reqwest_like_get(&d.http, "/v1/models", None).await;
    assert!(http.starts_with("HTTP/1.1 401"), "{http}");
    assert!(http.contains("\"invalid_api_key\""), "{http}");
    let ok = reqwest_like_get(&d.http, "/v1/models", Some(token)).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // Health stays open for supervisors.
    assert!(
        reqwest_like_get(&d.http, "/healthz", None)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Ollama's API takes the same token (its clients send headers); its `/` probe stays open.
    let ollama = reqwest_like_get(&d.ollama, "/api/tags", None).await;
    assert!(ollama.starts_with("HTTP/1.1 401"), "{ollama}");
    assert!(ollama.contains("{\"error\":"), "{ollama}");
    let ok = reqwest_like_get(&d.ollama, "/api/tags", Some(token)).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        reqwest_like_get(&d.ollama, "/", None)
            .await
            .contains("Ollama is running")
    );
    let metrics = reqwest_like_get(&d.http, "/metrics", Some(token)).await;
    assert!(
        metrics.contains("ult_unauthenticated_requests_total{front=\"grpc\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ult_unauthenticated_requests_total{front=\"http\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ult_unauthenticated_requests_total{front=\"ollama\"} 1"),
        "{metrics}"
    );
}

/// A minimal HTTP/1.1 GET over a TCP socket (the tests need no HTTP client crate for this).
async fn reqwest_like_get(addr: &str, path: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_size_and_per_client_limits() {
    let d = start(
        "max_request_bytes = \"64KiB\"\nmax_requests_per_client = 2\n",
        "",
    )
    .await;
    let mut c = d.client().await;
    // A message over the limit is refused by the transport, typed, and the daemon carries on.
    let huge = GenerateRequest {
        model: "smollm2".into(),
        prompt: "x".repeat(200_000),
        max_tokens: Some(1),
        ..Default::default()
    };
    let e = c.generate_text(huge).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::OutOfRange), "{e}");
    // HTTP: 413 in OpenAI's shape.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(&d.http).await.unwrap();
    let body = format!(
        "{{\"model\": \"smollm2\", \"prompt\": \"{}\"}}",
        "x".repeat(100_000)
    );
    s.write_all(format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 413"),
        "{}",
        &out[..out.len().min(200)]
    );
    assert!(out.contains("\"error\""));
    // Two long generations from this client run; the third is refused at once.
    c.load("gemma3", |_, _| {}).await.unwrap();
    let streams = futures::future::join_all((0..2).map(|_| {
        let mut c = c.clone();
        async move { c.generate(long("gemma3", 400)).await.unwrap() }
    }))
    .await;
    until(&mut c, "two in flight", |s| {
        let m = s.model("gemma3").unwrap();
        m.in_flight + m.queued == 2
    })
    .await;
    let e = c.generate_text(long("gemma3", 4)).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("per-client limit"), "{e}");
    drop(streams);
    until(&mut c, "the streams to end", |s| {
        s.model("gemma3").unwrap().in_flight == 0
    })
    .await;
    assert_eq!(
        c.generate_text(long("gemma3", 2))
            .await
            .unwrap()
            .1
            .completion_tokens,
        2
    );
}

/// Run as a child by `the_state_file_is_never_torn`: rewrites the state file as fast as it can.
#[test]
fn state_writer_child() {
    let Ok(path) = std::env::var("ULT_STATE_WRITER") else {
        return;
    };
    for i in 0u64.. {
        let state = ultd::state_file::DesiredState {
            version: 1,
            pinned: [format!("model-{i}")].into(),
            loaded: (0..i % 50).map(|j| format!("loaded-{j}")).collect(),
        };
        state.save(std::path::Path::new(&path)).unwrap();
    }
}

#[test]
fn the_state_file_is_never_torn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut writes_seen = std::collections::BTreeSet::new();
    for round in 0..25 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "state_writer_child", "--nocapture"])
            .env("ULT_STATE_WRITER", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill it at a pseudo-random moment (3 to 60 ms in).
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(3 + seed % 58));
        child.kill().unwrap();
        child.wait().unwrap();
        if !path.exists() {
            continue;
        }
        // Whatever moment it died at, the file is a whole state: one pin N and N mod 50 loads.
        let state = ultd::state_file::DesiredState::load(&path)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let pin = state.pinned.iter().next().unwrap();
        let n: u64 = pin.strip_prefix("model-").unwrap().parse().unwrap();
        assert_eq!(
            state.loaded.len() as u64,
            n % 50,
            "round {round}: torn state {state:?}"
        );
        writes_seen.insert(n);
    }
    assert!(
        writes_seen.len() > 1,
        "the writer made progress between kills"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_repointed_outside_the_model_roots_after_boot_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let real = ult_tests::models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let inside = root.join("smollm2.gguf");
    if std::fs::hard_link(&real, &inside).is_err() {
        std::fs::copy(&real, &inside).unwrap();
    }
    let link = root.join("current.gguf");
    std::os::unix::fs::symlink(&inside, &link).unwrap();
    let text = format!(
        "{}\n[models.smol]\npath = \"{}\"\nkind = \"chat\"\ncontext = 512\n",
        daemon_table(
            dir.path(),
            &format!("model_roots = [\"{}\"]", root.display())
        ),
        link.display()
    );
    let d = start_in(dir, &text).await;
    let mut c = d.client().await;
    // Repointed after boot to a file outside the root (a valid model, so only the roots can refuse it).
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = c
        .generate_text(ult_tests::paris_request("smol"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("outside the model roots"), "{e}");
    let s = c.status().await.unwrap();
    assert_ne!(s.model("smol").unwrap().state, ModelState::Resident);
}
