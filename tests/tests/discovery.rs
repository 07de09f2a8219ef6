//! Models found in the stores users already have (`[daemon] model_dirs`): real layouts built in a temp dir
//! from the shipped SmolLM2 GGUF (hard links, or copies across file systems) — Ollama's store with its
//! real sha256 digest and a manifest in Ollama's JSON format (config, model, template, params and system
//! layers), the Hugging Face hub cache (blobs, a snapshot symlink, refs/main) and LM Studio's folder —
//! served by their stores' names through a real ultd, one of them refined in models.toml by name.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::{Path, PathBuf};

use ult_tests::{completion, daemon_table, models_dir, start_in};

ult_tests::install_allocator!();

fn place(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst).unwrap();
    }
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Ollama's store holding SmolLM2 as `smollm2:135m`, with `num_ctx` 2048 in its params layer.
fn ollama_store(root: &Path, gguf: &Path) -> PathBuf {
    let store = root.join("ollama/models");
    let digest = sha256(gguf);
    place(gguf, &store.join(format!("blobs/sha256-{digest}")));
    let mut layers = vec![format!(
        r#"{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{digest}","size":{}}}"#,
        gguf.metadata().unwrap().len()
    )];
    let mut config = String::new();
    for (kind, body) in [
        ("template", "{{ .Prompt }}"),
        ("params", r#"{"num_ctx":2048,"stop":["<|im_end|>"]}"#),
        ("system", "You are a helpful assistant."),
        (
            "config",
            r#"{"model_format":"gguf","model_family":"llama"}"#,
        ),
    ] {
        let p = store.join("blob.tmp");
        std::fs::write(&p, body).unwrap();
        let d = sha256(&p);
        std::fs::rename(&p, store.join(format!("blobs/sha256-{d}"))).unwrap();
        let entry = |media: &str| {
            format!(
                r#"{{"mediaType":"{media}","digest":"sha256:{d}","size":{}}}"#,
                body.len()
            )
        };
        if kind == "config" {
            config = entry("application/vnd.docker.container.image.v1+json");
        } else {
            layers.push(entry(&format!("application/vnd.ollama.image.{kind}")));
        }
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{config},"layers":[{}]}}"#,
        layers.join(",")
    );
    let m = store.join("manifests/registry.ollama.ai/library/smollm2/135m");
    std::fs::create_dir_all(m.parent().unwrap()).unwrap();
    std::fs::write(m, manifest).unwrap();
    store
}

/// The Hugging Face hub cache: the file a blob, the snapshot's name a symlink to it.
fn hf_cache(root: &Path, gguf: &Path) -> PathBuf {
    let hub = root.join("hf/hub");
    let repo = hub.join("models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF");
    let digest = sha256(gguf);
    place(gguf, &repo.join(format!("blobs/{digest}")));
    let rev = "4d5e1a9c0b7f3e2d1c0b9a8f7e6d5c4b3a2f1e0d";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snap = repo.join(format!("snapshots/{rev}"));
    std::fs::create_dir_all(&snap).unwrap();
    std::os::unix::fs::symlink(
        format!("../../blobs/{digest}"),
        snap.join("smollm2-135m-instruct-q4_1.gguf"),
    )
    .unwrap();
    hub
}

fn lm_studio(root: &Path, gguf: &Path) -> PathBuf {
    let dir = root.join("lmstudio/models");
    place(
        gguf,
        &dir.join("lmstudio-community/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_1.gguf"),
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_in_ollama_hf_and_lm_studio_stores_serve_by_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = models_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let stores = [
        ollama_store(dir.path(), &gguf),
        hf_cache(dir.path(), &gguf),
        lm_studio(dir.path(), &gguf),
    ];
    let list: Vec<String> = stores
        .iter()
        .map(|s| format!("\"{}\"", s.display()))
        .collect();
    let text = format!(
        "{}model_dirs = [{}]\n\n[models.\"smollm2:135m\"]\naliases = [\"smol\"]\nmax_sequences = 2\n",
        daemon_table(dir.path(), ""),
        list.join(", ")
    );
    let d = start_in(dir, &text).await;
    let mut c = d.client().await;
    let status = c.status().await.unwrap();
    let find = |name: &str| {
        status
            .models
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} is served: {:?}", status.models))
    };
    let ollama = find("smollm2:135m");
    assert_eq!(ollama.aliases, ["smol"]);
    assert!(
        ollama.origin.starts_with("ollama ") && ollama.origin.ends_with(", refined in models.toml"),
        "{}",
        ollama.origin
    );
    assert_eq!(ollama.context_tokens, 2048, "Ollama's num_ctx");
    assert_eq!(ollama.max_sequences, 2);
    let hf = find("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF");
    assert!(hf.origin.starts_with("huggingface "), "{}", hf.origin);
    assert!(hf.path.ends_with("smollm2-135m-instruct-q4_1.gguf"));
    let lms = find("lmstudio-community/SmolLM2-135M-Instruct-GGUF");
    assert!(lms.origin.starts_with("lmstudio "), "{}", lms.origin);
    assert_eq!(status.models.len(), 3);

    // Served by their store names (and the alias models.toml gave one).
    for name in ["smol", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"] {
        let (text, stats) = c
            .generate_text(completion(name, "The capital of France is", 6))
            .await
            .unwrap();
        assert_eq!(stats.completion_tokens, 6, "{name}");
        assert!(!text.is_empty(), "{name}");
    }
}

/// A models.toml table without a path must name a discovered model; the error says which key.
#[test]
fn a_refinement_of_a_model_no_store_holds_is_refused_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let path = dir.path().join("models.toml");
    let text = format!(
        "[daemon]\nmodel_dirs = [\"{}\"]\n\n[models.\"llama3.2:3b\"]\naliases = [\"l\"]\n",
        empty.display()
    );
    let err = ultd::config::Config::parse(&path, &text).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("llama3.2:3b"), "{msg}");
    assert!(msg.contains("model_dirs"), "{msg}");
    assert_eq!(err.line, 4, "{msg}");
}
