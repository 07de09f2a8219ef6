//! gRPC benchmark: the same prompt and decode length as the in-process benchmark, through a running ultd,
//! timed at the client: time to first token, prompt tokens/s (prompt ÷ time to first token), and decode
//! tokens/s between the first and last delta. Median of `--reps`.
//!
//! `cargo run --release -p ult-client --example bench_grpc -- --addr 127.0.0.1:50051 --model smollm2`
//!
//! `--swap-with OTHER` measures swap latency instead: each rep makes OTHER resident (with a ceiling that
//! holds only one of the two, that evicts MODEL), makes sure MODEL is not resident, then times a one-token
//! request for MODEL to its first token: eviction, load, warm-up, prefill and the first decode step.
#![allow(clippy::unwrap_used)] // a benchmark may unwrap

use std::time::Instant;

use futures::StreamExt;
use ult_client::{Client, GenerateEvent, GenerateRequest, ModelState};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr = arg(&args, "--addr", "127.0.0.1:50051");
    let model = arg(&args, "--model", "smollm2");
    let prompt = std::fs::read_to_string(arg(&args, "--prompt-file", "/dev/null"))?;
    let decode: u32 = arg(&args, "--decode", "64").parse()?;
    let reps: usize = arg(&args, "--reps", "3").parse()?;
    let mut client = Client::connect(&addr).await?;
    let swap_with = arg(&args, "--swap-with", "");
    if !swap_with.is_empty() {
        return swap(&mut client, &model, &swap_with, reps).await;
    }
    client.load(&model, |_, _| {}).await?;
    let (mut prompt_rates, mut decode_rates, mut server_prompt, mut server_decode) =
        (vec![], vec![], vec![], vec![]);
    let mut prompt_tokens = 0;
    for _ in 0..reps {
        let req = GenerateRequest {
            model: model.clone(),
            prompt: prompt.clone(),
            max_tokens: Some(decode),
            ignore_eos: true,
            ..Default::default()
        };
        let started = Instant::now();
        let mut stream = client.generate(req).await?;
        let (mut first, mut last, mut deltas) = (None, None, 0u32);
        while let Some(event) = stream.next().await {
            match event? {
                GenerateEvent::Delta(_) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = Some(now);
                    deltas += 1;
                }
                GenerateEvent::Done(s) => {
                    prompt_tokens = s.prompt_tokens;
                    server_prompt.push(s.prompt_tokens_per_s);
                    server_decode.push(s.decode_tokens_per_s);
                    let (f, l) = (first.unwrap(), last.unwrap());
                    prompt_rates
                        .push(f64::from(s.prompt_tokens) / f.duration_since(started).as_secs_f64());
                    // Deltas can carry more than one token when a character spans tokens; count tokens.
                    decode_rates.push(
                        f64::from(s.completion_tokens - 1) / l.duration_since(f).as_secs_f64(),
                    );
                    let _ = deltas;
                }
            }
        }
    }
    println!(
        "{{\"model\":\"{model}\",\"prompt_tokens\":{prompt_tokens},\"client_prompt_tok_s\":{:.2},\"client_decode_tok_s\":{:.2},\"server_prompt_tok_s\":{:.2},\"server_decode_tok_s\":{:.2}}}",
        median(prompt_rates),
        median(decode_rates),
        median(server_prompt),
        median(server_decode)
    );
    Ok(())
}

/// A one-token request.
fn one_token(model: &str) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: "The capital of France is".into(),
        max_tokens: Some(1),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Request for a non-resident `model` → first token, `reps` times, with `other` made resident before each.
async fn swap(client: &mut Client, model: &str, other: &str, reps: usize) -> anyhow::Result<()> {
    let mut times = Vec::new();
    let mut evicted_by_policy = 0;
    for _ in 0..reps {
        client.generate_text(one_token(other)).await?;
        let resident = client
            .status()
            .await?
            .model(model)
            .is_some_and(|m| matches!(m.state, ModelState::Resident | ModelState::Loading));
        if resident {
            client.unload(model).await?;
        } else {
            evicted_by_policy += 1;
        }
        let started = Instant::now();
        let mut stream = client.generate(one_token(model)).await?;
        let mut first = None;
        while let Some(event) = stream.next().await {
            if let GenerateEvent::Delta(_) = event? {
                first.get_or_insert_with(|| started.elapsed());
            }
        }
        times.push(first.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0));
    }
    let status = client.status().await?;
    let bytes = status
        .model(model)
        .and_then(|m| m.measured_bytes)
        .unwrap_or(0);
    println!(
        "{{\"model\":\"{model}\",\"swap_with\":\"{other}\",\"swap_to_first_token_ms\":{:.1},\"resident_bytes\":{bytes},\"evicted_by_policy\":{evicted_by_policy},\"reps\":{reps}}}",
        median(times)
    );
    Ok(())
}
