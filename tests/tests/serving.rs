//! Serving behaviour over a real socket: several models resident and running at once, single-flight lazy
//! loads, unloads that free memory, typed errors that leave everyone else served, and cancellation when
//! a client disconnects mid-stream.
#![allow(clippy::unwrap_used)] // tests and examples may unwrap

use futures::StreamExt;
use ult_client::{GenerateEvent, ModelState};
use ult_tests::{completion, paris_request, start};

ult_tests::install_allocator!();

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_models_resident_and_generating_concurrently() {
    let d = start("", "").await;
    let (mut a, mut b) = (d.client().await, d.client().await);
    let (ra, rb) = tokio::join!(
        a.generate_text(paris_request("smollm2")),
        b.generate_text(completion("gemma3", "The capital of France is", 16)),
    );
    let (text_a, _) = ra.unwrap();
    let (text_b, stats_b) = rb.unwrap();
    assert!(text_a.contains("Paris"), "{text_a}");
    assert_eq!(stats_b.completion_tokens, 16, "{text_b}");
    let s = a.status().await.unwrap();
    for m in ["smollm2", "gemma3"] {
        assert_eq!(s.model(m).unwrap().state, ModelState::Resident, "{m}");
    }
    assert_eq!(s.model("minilm").unwrap().state, ModelState::Unloaded);
    // The ledger charges both, and what it charges is what was measured (or more).
    let charged: u64 = s.models.iter().map(|m| m.charged_bytes).sum();
    assert_eq!(charged, s.daemon.used_bytes);
    assert!(
        s.models
            .iter()
            .filter(|m| m.state == ModelState::Resident)
            .all(|m| m.charged_bytes >= m.measured_bytes.unwrap())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_for_a_cold_model_share_one_load() {
    let d = start("", "").await;
    let mut watch = d.client().await.watch().await.unwrap();
    let clients: Vec<_> = futures::future::join_all((0..4).map(|_| d.client())).await;
    let results = futures::future::join_all(clients.into_iter().map(|mut c| async move {
        c.generate_text(completion("smollm2", "Once upon a time", 4))
            .await
    }))
    .await;
    let caused: Vec<bool> = results
        .into_iter()
        .map(|r| r.unwrap().1.load_ms.is_some())
        .collect();
    assert_eq!(caused.len(), 4);
    let s = d.client().await.status().await.unwrap();
    let m = s.model("smollm2").unwrap();
    assert_eq!(m.loads, 1, "one load for four concurrent requests");
    assert_eq!(m.requests, 4);
    // Exactly one "loaded" event for it.
    let mut loaded = 0;
    while let Ok(Some(Ok(item))) =
        tokio::time::timeout(std::time::Duration::from_millis(200), watch.next()).await
    {
        if item.kind == "loaded" && item.model.as_deref() == Some("smollm2") {
            loaded += 1;
        }
    }
    assert_eq!(loaded, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_frees_the_memory() {
    let d = start("", "").await;
    let mut c = d.client().await;
    let before = ultd::alloc::live_bytes();
    let loaded = c.load("gemma3", |_, _| {}).await.unwrap();
    assert!(loaded.loaded_now);
    let resident = ultd::alloc::live_bytes();
    let s = c.status().await.unwrap();
    let g = s.model("gemma3").unwrap();
    assert_eq!(g.state, ModelState::Resident);
    let measured = g.measured_bytes.unwrap();
    assert!(
        resident - before >= measured as i64 * 9 / 10,
        "heap grew by {} for {measured}",
        resident - before
    );
    let u = c.unload("gemma3").await.unwrap();
    assert!(u.unloaded);
    assert_eq!(u.freed_bytes, g.charged_bytes);
    // The unload completes when the worker has dropped the model.
    let mut watch = c.watch().await.unwrap();
    loop {
        let s = c.status().await.unwrap();
        if s.model("gemma3").unwrap().state == ModelState::Unloaded {
            assert_eq!(s.daemon.used_bytes, 0);
            break;
        }
        // Wait for the next state change rather than sleeping.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), watch.next()).await;
    }
    let after = ultd::alloc::live_bytes();
    assert!(
        resident - after >= measured as i64 * 9 / 10,
        "heap shrank by only {} of {measured}",
        resident - after
    );
    // Unloading again is a negative answer, not an error.
    assert!(!c.unload("gemma3").await.unwrap().unloaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_typed_and_leave_others_served() {
    let dir = tempfile::tempdir().unwrap();
    // A truncated copy of SmolLM2: the header survives, the tensors do not.
    let original =
        std::fs::read(ult_tests::models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
            .unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &original[..original.len() / 3]).unwrap();
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    let more = format!(
        "\n[models.truncated]\npath = \"{}\"\nkind = \"chat\"\n\n[models.garbage]\npath = \"{}\"\nkind = \"completion\"\n",
        truncated.display(),
        garbage.display()
    );
    let d = start("", &more).await;
    let mut c = d.client().await;

    // Unknown model: NOT_FOUND, listing the known names.
    let e = c
        .generate_text(completion("gpt-7", "hi", 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound));
    assert!(
        e.to_string()
            .contains("known models: garbage, gemma3, minilm, smol, smollm2, truncated"),
        "{e}"
    );

    // Corrupt files: the models are failed with the reason, the requests get UNAVAILABLE.
    let s = c.status().await.unwrap();
    let t = s.model("truncated").unwrap();
    assert_eq!(t.state, ModelState::Failed);
    assert!(
        t.failure.as_deref().unwrap().contains("truncated"),
        "{:?}",
        t.failure
    );
    let g = s.model("garbage").unwrap();
    assert_eq!(g.state, ModelState::Failed);
    assert!(
        g.failure.as_deref().unwrap().contains("corrupt model file"),
        "{:?}",
        g.failure
    );
    let e = c
        .generate_text(paris_request("truncated"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");

    // A prompt longer than the context: INVALID_ARGUMENT with both numbers, before any load; tokenizing
    // stops once past the context instead of counting all 3001 tokens.
    let long = "word ".repeat(3000);
    let e = c
        .generate_text(completion("smollm2", &long, 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    assert!(
        e.to_string().contains("more than 2047 tokens") && e.to_string().contains("holds 2048"),
        "{e}"
    );
    assert_eq!(
        c.status().await.unwrap().model("smollm2").unwrap().state,
        ModelState::Unloaded
    );

    // Bad parameters name the field.
    let mut bad = paris_request("smollm2");
    bad.sampling.temperature = Some(-1.0);
    let e = c.generate_text(bad).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    assert!(e.to_string().contains("temperature"), "{e}");
    let e = c.embed("smollm2", vec!["x".into()]).await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition), "{e}");
    let e = c
        .generate_text(completion("minilm", "x", 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition), "{e}");

    // Everyone else is still served.
    let (text, _) = c.generate_text(paris_request("smollm2")).await.unwrap();
    assert!(text.contains("Paris"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_stops_its_generation() {
    let d = start("", "").await;
    let mut c = d.client().await;
    c.load("gemma3", |_, _| {}).await.unwrap();
    // A base model continuing text greedily does not stop on its own within 1000 tokens.
    let req = completion("gemma3", "The capital of France is", 1000);
    let mut received = 0u64;
    {
        let stream = c.generate(req).await.unwrap();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let GenerateEvent::Delta(_) = event.unwrap() {
                received += 1;
            }
            if received == 10 {
                break;
            }
        }
        // Dropping the stream resets the HTTP/2 stream: the client is gone.
    }

    // Wait for the request to leave flight (state changes are polled, never slept on).
    let mut status = c.status().await.unwrap();
    for _ in 0..2000 {
        let m = status.model("gemma3").unwrap();
        if m.in_flight == 0 && m.cancelled == 1 {
            break;
        }
        tokio::task::yield_now().await;
        status = c.status().await.unwrap();
    }
    let m = status.model("gemma3").unwrap();
    assert_eq!((m.in_flight, m.cancelled, m.completed), (0, 1, 0));
    // A delta carries at most one token; the worker noticed within a few decode steps of the reset,
    // not after the 1500 tokens it was asked for.
    assert!(
        m.generated_tokens < received + 8,
        "generated {} after receiving {received}",
        m.generated_tokens
    );
    // The model keeps serving.
    let (text, _) = c
        .generate_text(completion("gemma3", "The capital of France is", 8))
        .await
        .unwrap();
    assert!(text.contains("France"), "{text}");
}
