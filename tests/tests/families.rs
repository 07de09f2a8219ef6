//! Every model family end to end through a real ultd (what `ultctl generate` does, over gRPC): the tiny
//! random-weight GGUF of each family (scripts/families/make-ggufs.sh) loads with its footprint predicted
//! from the header within ±5% of what the load measured, and a greedy completion of the fixture's prompt
//! returns exactly llama.cpp's greedy continuation (engine/tests/fixtures/families/*.json).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::PathBuf;

use ult_client::GenerateRequest;
use ult_tests::start;

ult_tests::install_allocator!();

/// The family's first file (F32, F16, Q8_0, Q4_K) whose llama.cpp continuation is whole UTF-8 text (a
/// random model may stop inside a character, which no text API can return), with its prompt, its
/// continuation's token count and text.
fn pick(family: &str) -> (PathBuf, String, u32, String) {
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../engine/tests/fixtures/families"
    );
    for ty in ["F32", "F16", "Q8_0", "Q4_K"] {
        let name = format!("{family}.{ty}");
        let text = std::fs::read_to_string(format!("{fixtures}/{name}.json")).unwrap();
        let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
        let hex = fx["greedy_hex"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        if let Ok(greedy) = String::from_utf8(bytes) {
            let path = ult_tests::models_dir().join(format!("families/{name}.gguf"));
            assert!(
                path.exists(),
                "{} is missing: run scripts/families/make-ggufs.sh",
                path.display()
            );
            let n = fx["greedy"].as_array().unwrap().len() as u32;
            return (path, fx["prompt"].as_str().unwrap().to_string(), n, greedy);
        }
    }
    panic!("no {family} fixture has a whole-text continuation");
}

async fn check(family: &str) {
    let (path, prompt, n, want) = pick(family);
    let d = start(
        "",
        &format!(
            "[models.fam]\npath = \"{}\"\nkind = \"completion\"\ncontext = 256\nmax_sequences = 2\n",
            path.display()
        ),
    )
    .await;
    let mut c = d.client().await;
    let loaded = c.load("fam", |_, _| {}).await.unwrap();
    let (measured, predicted) = (loaded.measured_bytes as f64, loaded.predicted_bytes as f64);
    // ±5%, as for the real models, plus 2 MiB of fixed allocations that a 20 MB model cannot hide
    // (qwen3's tiny file measured 1.07 MB over its prediction).
    assert!(
        (measured - predicted).abs() <= 0.05 * predicted + 2.0 * 1024.0 * 1024.0,
        "{family}: measured {measured} vs predicted {predicted}"
    );
    let req = GenerateRequest {
        model: "fam".into(),
        prompt,
        max_tokens: Some(n),
        ignore_eos: true,
        ..Default::default()
    };
    let (text, stats) = c.generate_text(req).await.unwrap();
    assert_eq!(stats.completion_tokens, n);
    assert_eq!(text, want, "{family}: ultd's greedy text = llama.cpp's");
    eprintln!(
        "{family}: {} predicted {predicted} measured {measured} ({:+.2}%)",
        path.display(),
        (measured - predicted) / predicted * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama3_generates_as_llama_cpp() {
    check("llama3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistral_generates_as_llama_cpp() {
    check("mistral").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2_generates_as_llama_cpp() {
    check("qwen2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen3_generates_as_llama_cpp() {
    check("qwen3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen3moe_generates_as_llama_cpp() {
    check("qwen3moe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phi3_generates_as_llama_cpp() {
    check("phi3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_generates_as_llama_cpp() {
    check("gemma3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepseek2_generates_as_llama_cpp() {
    check("deepseek2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepseek2_lite_generates_as_llama_cpp() {
    check("deepseek2-lite").await;
}

/// Model folders through ultd (issue 15): a bf16 Hugging Face Llama (rope_freqs from its rope_scaling,
/// permuted query and key rows), an MLX 4-bit Qwen3-MoE and an MLX 8-bit Qwen3 load with footprints
/// predicted from their safetensors headers within ±5% (+2 MiB) of what the load measured, and serve
/// greedy completions; the bf16 folder's text is mlx-lm's greedy continuation (its 12 tokens, decoded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_folders_serve_through_ultd_with_predicted_footprints() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../engine/tests/fixtures/mlx");
    for name in ["hf-llama", "mlx-qwen3moe-q4", "mlx-qwen3-q8"] {
        let dir = ult_tests::models_dir().join("mlx").join(name);
        assert!(
            dir.join("config.json").exists(),
            "{} is missing: run scripts/mlx/make-checkpoints.sh",
            dir.display()
        );
        let fx: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{fixtures}/{name}.json")).unwrap(),
        )
        .unwrap();
        let d = start(
            "",
            &format!(
                "[models.folder]\npath = \"{}\"\nkind = \"chat\"\ncontext = 256\nmax_sequences = 2\n",
                dir.display()
            ),
        )
        .await;
        let mut c = d.client().await;
        let loaded = c.load("folder", |_, _| {}).await.unwrap();
        let (measured, predicted) = (loaded.measured_bytes as f64, loaded.predicted_bytes as f64);
        assert!(
            (measured - predicted).abs() <= 0.05 * predicted + 2.0 * 1024.0 * 1024.0,
            "{name}: measured {measured} vs predicted {predicted}"
        );
        let status = c.status().await.unwrap();
        let m = status.model("folder").unwrap();
        assert_eq!(
            m.kind, "chat",
            "{name}: its chat template came from the folder"
        );
        let greedy: Vec<u32> = fx["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let req = GenerateRequest {
            model: "folder".into(),
            prompt: fx["prompt"].as_str().unwrap().to_string(),
            max_tokens: Some(greedy.len() as u32),
            ignore_eos: true,
            ..Default::default()
        };
        let (text, stats) = c.generate_text(req).await.unwrap();
        assert_eq!(stats.completion_tokens, greedy.len() as u32, "{name}");
        if name.starts_with("hf-") {
            let tokenizer = ult_engine::tokenizer::Tokenizer::from_dir(&dir).unwrap();
            assert_eq!(
                text,
                tokenizer.decode(&greedy),
                "{name}: ultd's greedy text = mlx-lm's"
            );
        }
        eprintln!(
            "{name}: predicted {predicted} measured {measured} ({:+.2}%)",
            (measured - predicted) / predicted * 100.0
        );
    }
}
