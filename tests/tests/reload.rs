//! Live reload (`ultctl reload`, the gRPC `Reload`; SIGHUP is tested on the binary in daemon/tests/cli.rs)
//! through a real ultd on real models: while SmolLM2 streams, models.toml changes SmolLM2's context, drops
//! MiniLM and adds Gemma 3. The stream finishes untouched; a request sent meanwhile waits and is served by
//! the reloaded SmolLM2; MiniLM is unknown once its request is done; Gemma 3 serves. Then a bad edit is
//! refused with its file, line and key while everything keeps serving.
#![allow(clippy::unwrap_used)] // tests may unwrap

use futures::StreamExt;
use ult_client::{GenerateEvent, ModelState};
use ult_tests::{completion, daemon_table, models_dir, start_in};

ult_tests::install_allocator!();

fn models(smollm2_context: u32, with_minilm: bool, with_gemma3: bool) -> String {
    let m = models_dir();
    let mut t = format!(
        "[models.smollm2]\npath = \"{}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\"\nkind = \"chat\"\ncontext = {smollm2_context}\n",
        m.display()
    );
    if with_minilm {
        t += &format!(
            "\n[models.minilm]\npath = \"{}/minilm\"\nkind = \"embedding\"\ncontext = 256\n",
            m.display()
        );
    }
    if with_gemma3 {
        t += &format!(
            "\n[models.gemma3]\npath = \"{}/gemma3/gemma-3-270m-q4_k_m.gguf\"\nkind = \"completion\"\ncontext = 512\n",
            m.display()
        );
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_adds_changes_and_removes_models_without_disturbing_requests() {
    let dir = tempfile::tempdir().unwrap();
    let head = daemon_table(dir.path(), "");
    let d = start_in(dir, &format!("{head}{}", models(2048, true, false))).await;
    let toml = d.dir.path().join("models.toml");
    let mut c = d.client().await;
    c.embed("minilm", vec!["hello".into()]).await.unwrap();

    // A stream on SmolLM2, running when the configuration changes under it.
    let mut streaming = d.client().await;
    let mut long = completion("smollm2", "Once upon a time", 64);
    long.ignore_eos = true;
    let mut stream = streaming.generate(long).await.unwrap();
    let Some(Ok(GenerateEvent::Delta(mut text))) = stream.next().await else {
        panic!("no first delta");
    };
    let before = c.status().await.unwrap();
    let loads_before = before.model("smollm2").unwrap().loads;
    assert_eq!(before.model("smollm2").unwrap().context_tokens, 2048);

    std::fs::write(&toml, format!("{head}{}", models(1024, false, true))).unwrap();
    let summary = c.reload().await.unwrap();
    assert_eq!(summary.added, ["gemma3"]);
    assert_eq!(summary.removed, ["minilm"]);
    assert_eq!(summary.reloaded, ["smollm2"]);
    assert_eq!(summary.unchanged, 0);

    // A request for SmolLM2 sent after the reload waits for the running stream, then for the reload.
    let mut later = d.client().await;
    let waiting = tokio::spawn(async move {
        later
            .generate_text(completion("smollm2", "The capital of France is", 4))
            .await
    });
    let mut done = None;
    while let Some(ev) = stream.next().await {
        match ev.unwrap() {
            GenerateEvent::Delta(t) => text.push_str(&t),
            GenerateEvent::Done(stats) => done = Some(stats),
        }
    }
    let stats = done.expect("the running stream ends normally");
    assert_eq!(stats.completion_tokens, 64, "the stream ran to its end");
    let (answer, later_stats) = waiting.await.unwrap().unwrap();
    assert_eq!(later_stats.completion_tokens, 4, "{answer:?}");

    let after = c.status().await.unwrap();
    let smol = after.model("smollm2").unwrap();
    assert_eq!(smol.context_tokens, 1024, "served with the new context");
    assert_eq!(
        smol.loads,
        loads_before + 1,
        "reloaded once, after the stream"
    );
    assert!(after.model("minilm").is_none(), "{:?}", after.models);
    let err = c.embed("minilm", vec!["hello".into()]).await.unwrap_err();
    assert!(err.to_string().contains("minilm"), "{err}");
    let (_, g) = c
        .generate_text(completion("gemma3", "The capital of France is", 3))
        .await
        .unwrap();
    assert_eq!(g.completion_tokens, 3);

    // A bad edit: refused with file, line and key; nothing changes and everything serves.
    let bad = format!("{head}{}contxt = 5\n", models(1024, false, true));
    std::fs::write(&toml, &bad).unwrap();
    let line = bad.lines().position(|l| l.starts_with("contxt")).unwrap() + 1;
    let err = c.reload().await.unwrap_err().to_string();
    assert!(err.contains("models.toml"), "{err}");
    assert!(err.contains(&format!(":{line}")), "line {line}: {err}");
    assert!(err.contains("contxt"), "{err}");
    let still = c.status().await.unwrap();
    assert_eq!(
        still
            .models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["gemma3", "smollm2"]
    );
    assert_eq!(still.model("smollm2").unwrap().state, ModelState::Resident);
    let (_, s) = c
        .generate_text(completion("smollm2", "The capital of France is", 3))
        .await
        .unwrap();
    assert_eq!(s.completion_tokens, 3);

    // Fixed again: a settings-only change (keep-alive) updates in place, without a reload.
    let fixed = format!("{head}{}keep_alive = \"10m\"\n", models(1024, false, true));
    std::fs::write(&toml, fixed).unwrap();
    let summary = c.reload().await.unwrap();
    assert_eq!(summary.updated, ["gemma3"], "{summary:?}");
    assert!(summary.reloaded.is_empty(), "{summary:?}");
    let s = c.status().await.unwrap();
    assert_eq!(s.model("smollm2").unwrap().loads, loads_before + 1);
}
