//! GPU correctness: runs every shipped model family on two devices (CPU and CUDA by default) with ult's
//! engine and compares them: next-token logits after the same prompt and along a teacher-forced greedy
//! path (relative L2 error, max absolute error, argmax agreement), the first `--tokens` greedy tokens each
//! device picks on its own, and BERT embeddings (cosine, max absolute error). Exits 1 if any check fails.
//!
//! `compare --reference cpu --device cuda:0 --models-dir models --tokens 32`
//!
//! Tolerances (stated here and in BENCHMARKS.md): logits relative L2 ≤ 2% at every position, argmax equal at
//! every teacher-forced position unless the reference's top two are within 0.05 of each other, greedy
//! sequences equal up to the first such near-tie; embeddings cosine ≥ 0.9999. Quantized matmuls differ by
//! design between backends (the CPU quantizes activations to 8 bits, the GPU kernels differ in order of
//! summation), so bit equality is not expected.
#![allow(clippy::unwrap_used)] // a check tool may unwrap

use ultd::engine::{CandleEngine, Engine, LoadedModel, ModelKind, ModelSource};

#[global_allocator]
static ALLOC: ultd::alloc::Counting = ultd::alloc::Counting;

const PROMPT: &str = "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n";
const GEMMA_PROMPT: &str = "<start_of_turn>user\nWhat is the capital of France? Answer in one sentence.<end_of_turn>\n<start_of_turn>model\n";
const LOGIT_TOL: f64 = 0.02;
const TIE: f32 = 0.05;
const COSINE_MIN: f64 = 0.9999;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// The reference's margin between its best token and `other`.
fn margin(v: &[f32], other: usize) -> f32 {
    v[argmax(v)] - v[other]
}

/// (relative L2, max absolute difference).
fn diff(a: &[f32], b: &[f32]) -> (f64, f64) {
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    let mut max = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let d = f64::from(x - y);
        num += d * d;
        den += f64::from(*x) * f64::from(*x);
        max = max.max(d.abs());
    }
    ((num / den.max(1e-30)).sqrt(), max)
}

fn greedy(model: &mut dyn LoadedModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    let mut logits = model.begin(prompt).unwrap();
    for _ in 0..n {
        let t = argmax(&logits) as u32;
        out.push(t);
        logits = model.step(t).unwrap();
    }
    out
}

fn main() -> anyhow::Result<()> {
    // SAFETY: first thing in main, before any other thread exists or CUDA is initialised.
    #[cfg(feature = "cuda")]
    unsafe {
        ultd::engine::cuda_jit::configure_cache();
    }
    let args: Vec<String> = std::env::args().collect();
    let reference = CandleEngine::new(&arg(&args, "--reference", "cpu"))?;
    let device = CandleEngine::new(&arg(&args, "--device", "cuda:0"))?;
    let dir = arg(&args, "--models-dir", "models");
    let n: usize = arg(&args, "--tokens", "32").parse()?;
    println!(
        "{} versus {} (reference); tolerances: logits rel-L2 <= {LOGIT_TOL}, argmax equal unless a near-tie (< {TIE}), embeddings cosine >= {COSINE_MIN}",
        device.device_name(),
        reference.device_name()
    );
    let mut failed = false;
    for (name, file, prompt) in [
        ("smollm2", format!("{dir}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), PROMPT),
        ("gemma3", format!("{dir}/gemma3/gemma-3-270m-q4_k_m.gguf"), GEMMA_PROMPT),
    ] {
        let source = ModelSource {
            name: name.into(),
            kind: ModelKind::Completion,
            path: file.into(),
            context: Some(512),
            max_sequences: 1,
            chat_template: None,
        };
        let inspection = reference.inspect(&source)?;
        let ids = inspection.tokenizer.encode(prompt, true);
        let mut a = reference.load(&source, &inspection, 512, &|_| {})?;
        let mut b = device.load(&source, &inspection, 512, &|_| {})?;
        // Teacher-forced: both devices see the reference's greedy tokens, so every position compares.
        let mut la = a.begin(&ids)?;
        let mut lb = b.begin(&ids)?;
        let (mut worst_rel, mut worst_abs, mut agree, mut ties) = (0.0f64, 0.0f64, 0usize, 0usize);
        let mut bad_argmax = 0usize;
        for _ in 0..n {
            let (rel, abs) = diff(&la, &lb);
            worst_rel = worst_rel.max(rel);
            worst_abs = worst_abs.max(abs);
            let (ta, tb) = (argmax(&la), argmax(&lb));
            if ta == tb {
                agree += 1;
            } else if margin(&la, tb) < TIE {
                ties += 1;
            } else {
                bad_argmax += 1;
            }
            la = a.step(ta as u32)?;
            lb = b.step(ta as u32)?;
        }
        // Free-running greedy on each device.
        let ga = greedy(a.as_mut(), &ids, n);
        let gb = greedy(b.as_mut(), &ids, n);
        let same = ga.iter().zip(&gb).take_while(|(x, y)| x == y).count();
        let ok = worst_rel <= LOGIT_TOL && bad_argmax == 0 && (same == n || ties > 0);
        failed |= !ok;
        println!(
            "{name:<8} logits rel-L2 max {worst_rel:.2e}, max-abs {worst_abs:.3}, argmax agree {agree}/{n} (near-ties {ties}), greedy tokens identical {same}/{n}: {}",
            if ok { "ok" } else { "FAIL" }
        );
        println!(
            "         reference: {:?}\n         device:    {:?}",
            inspection.tokenizer.decode(&ga),
            inspection.tokenizer.decode(&gb)
        );
    }
    let source = ModelSource {
        name: "minilm".into(),
        kind: ModelKind::Embedding,
        path: format!("{dir}/minilm").into(),
        context: None,
        max_sequences: 1,
        chat_template: None,
    };
    let inspection = reference.inspect(&source)?;
    let mut a = reference.load(&source, &inspection, 0, &|_| {})?;
    let mut b = device.load(&source, &inspection, 0, &|_| {})?;
    for text in [
        "The capital of France is Paris.",
        "Lighthouses guided ships into harbour for two thousand years.",
    ] {
        let ids = inspection.tokenizer.encode(text, true);
        let (ea, eb) = (a.embed(&ids)?, b.embed(&ids)?);
        let dot: f64 = ea.iter().zip(&eb).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        let na: f64 = ea.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = eb.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / (na * nb).max(1e-30);
        let (_, abs) = diff(&ea, &eb);
        let ok = cosine >= COSINE_MIN;
        failed |= !ok;
        println!(
            "minilm   cosine {cosine:.7}, max-abs {abs:.2e} ({} dims): {}",
            ea.len(),
            if ok { "ok" } else { "FAIL" }
        );
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
