//! Loads each default model in-process and prints a greedy answer, timings and memory: a quick check.
#![allow(clippy::unwrap_used)] // tests and examples may unwrap
use std::sync::Arc;
use std::time::Instant;

use ultd::engine::sampler::SamplingParams;
use ultd::engine::template::ChatMessage;
use ultd::engine::worker::{GenEvent, GenerateJob, generate};
use ultd::engine::{CandleEngine, Engine, ModelKind, ModelSource};

#[global_allocator]
static ALLOC: ultd::alloc::Counting = ultd::alloc::Counting;

fn main() -> anyhow::Result<()> {
    let engine = CandleEngine::new("cpu")?;
    let models = [
        (
            "smollm2",
            ModelKind::Chat,
            "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        (
            "gemma3",
            ModelKind::Completion,
            "models/gemma3/gemma-3-270m-q4_k_m.gguf",
        ),
    ];
    for (name, kind, path) in models {
        let source = ModelSource {
            name: name.into(),
            kind,
            path: path.into(),
            context: Some(2048),
            max_sequences: 1,
            chat_template: None,
        };
        let t = Instant::now();
        let insp = engine.inspect(&source)?;
        println!(
            "{name}: inspect {:?} predicted {:?}",
            t.elapsed(),
            insp.footprint
        );
        let before = ultd::alloc::thread_net_bytes();
        let t = Instant::now();
        let mut model = engine.load(&source, &insp, 2048, &|_| {})?;
        println!(
            "{name}: load {:?}, measured {} bytes (predicted steady {})",
            t.elapsed(),
            ultd::alloc::thread_net_bytes() - before,
            insp.footprint.total() - insp.footprint.scratch_bytes
        );
        let prompt = match kind {
            ModelKind::Chat => insp.template.as_ref().unwrap().render(
                &[ChatMessage {
                    role: "user".into(),
                    content: "What is the capital of France?".into(),
                }],
                true,
            )?,
            _ => "The capital of France is".into(),
        };
        let ids = insp.tokenizer.encode(&prompt, true);
        if name == "smollm2" {
            let l = model.begin(&ids)?;
            println!("first logits {:?}", &l[..8]);
            for (sys, q) in [
                (None, "What is the capital of France?"),
                (
                    Some("You are a helpful assistant."),
                    "What is the capital of France?",
                ),
                (None, "What is the capital of France? Answer in one word."),
                (None, "What's the capital city of France?"),
            ] {
                let mut msgs = vec![];
                if let Some(s) = sys {
                    msgs.push(ChatMessage {
                        role: "system".into(),
                        content: s.into(),
                    });
                }
                msgs.push(ChatMessage {
                    role: "user".into(),
                    content: q.into(),
                });
                let p = insp.template.as_ref().unwrap().render(&msgs, true)?;
                let ids = insp.tokenizer.encode(&p, true);
                let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
                generate(
                    model.as_mut(),
                    &insp.tokenizer,
                    GenerateJob {
                        prompt: ids,
                        max_tokens: 24,
                        sampling: SamplingParams::default(),
                        stop: vec![],
                        events: tx,
                        submitted: Instant::now(),
                    },
                )?;
                let mut text = String::new();
                while let Ok(GenEvent::Delta(d)) = rx.try_recv() {
                    text.push_str(&d);
                }
                println!("  variant sys={sys:?} q={q:?} -> {text:?}");
            }
        }
        println!(
            "{name}: prompt {} tokens: {:?}",
            ids.len(),
            &ids[..ids.len().min(40)]
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let stats = generate(
            model.as_mut(),
            &insp.tokenizer,
            GenerateJob {
                prompt: ids,
                max_tokens: 48,
                sampling: SamplingParams::default(),
                stop: vec![],
                events: tx,
                submitted: Instant::now(),
            },
        )?;
        let mut text = String::new();
        while let Ok(GenEvent::Delta(d)) = rx.try_recv() {
            text.push_str(&d);
        }
        println!(
            "{name}: {text:?}\n  {stats:?} prompt {:.1} tok/s decode {:.1} tok/s",
            stats.prompt_tps(),
            stats.decode_tps()
        );
    }
    let source = ModelSource {
        name: "minilm".into(),
        kind: ModelKind::Embedding,
        path: "models/minilm".into(),
        context: Some(256),
        max_sequences: 1,
        chat_template: None,
    };
    let insp = engine.inspect(&source)?;
    let mut model = engine.load(&source, &insp, 256, &|_| {})?;
    let mut e = |t: &str| model.embed(&insp.tokenizer.encode(t, true));
    let a = e("A cat sits on the mat")?;
    let b = e("A kitten rests on a rug")?;
    let c = e("Stock markets fell sharply")?;
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    println!(
        "minilm: cat~kitten {:.4} cat~stocks {:.4} first {:?}",
        dot(&a, &b),
        dot(&a, &c),
        &a[..4]
    );
    let _ = Arc::new(());
    Ok(())
}
