//! gRPC benchmark: the same prompt and decode length as the in-process benchmark, through a running ultd,
//! timed at the client: time to first token, prompt tokens/s (prompt ÷ time to first token), and decode
//! tokens/s between the first and last delta. Median of `--reps`.
//!
//! `cargo run --release -p ult-client --example bench_grpc -- --addr 127.0.0.1:50051 --model smollm2`
//!
//! `--swap-with OTHER` measures swap latency instead: each rep makes OTHER resident (with a ceiling that
//! holds only one of the two, that evicts MODEL), makes sure MODEL is not resident, then times a one-token
//! request for MODEL to its first token: eviction, load, warm-up, prefill and the first decode step.
//!
//! `--cancel-after N` measures cancellation instead: each rep starts a long generation, drops the stream
//! after N deltas (the HTTP/2 stream is reset, as when a client dies), and polls Status until the request has
//! left flight and is counted cancelled: the time from the drop until the sequence and its KV are freed,
//! and how many tokens the worker decoded after the drop. Then it times a new request's first token, which
//! shows the freed slot serving again.
#![allow(clippy::unwrap_used)] // a benchmark may unwrap

#[path = "../../daemon/examples/common/mod.rs"]
mod common;
use common::{arg, median};

use std::time::Instant;

use futures::StreamExt;
use ult_client::{Client, GenerateEvent, GenerateRequest, ModelState};

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
    let cancel_after: u32 = arg(&args, "--cancel-after", "0").parse()?;
    if cancel_after > 0 {
        return cancel(&mut client, &model, cancel_after, reps).await;
    }
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

/// Milliseconds from sending a one-token request for `model` to its first delta.
async fn first_token_ms(client: &mut Client, model: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut stream = client.generate(one_token(model)).await?;
    let mut first = None;
    while let Some(event) = stream.next().await {
        if let GenerateEvent::Delta(_) = event? {
            first.get_or_insert_with(|| started.elapsed());
        }
    }
    Ok(first.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0))
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
        times.push(first_token_ms(client, model).await?);
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

/// Drop a stream after `after` deltas; time until the daemon has freed the sequence.
async fn cancel(client: &mut Client, model: &str, after: u32, reps: usize) -> anyhow::Result<()> {
    let (mut freed_ms, mut extra_tokens, mut next_ttft_ms) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let before = client.status().await?;
        let m = before.model(model).unwrap();
        let (cancelled0, generated0) = (m.cancelled, m.generated_tokens);
        let req = GenerateRequest {
            model: model.into(),
            prompt: "The capital of France is".into(),
            max_tokens: Some(800),
            ignore_eos: true,
            ..Default::default()
        };
        let mut stream = client.generate(req).await?;
        let mut received = 0u64;
        while let Some(event) = stream.next().await {
            // A delta carries at least one token, so generated − received bounds the tokens decoded
            // after the drop from above.
            if let GenerateEvent::Delta(_) = event? {
                received += 1;
                if received >= u64::from(after) {
                    break;
                }
            }
        }
        drop(stream);
        let dropped = Instant::now();
        let freed = loop {
            // Poll every millisecond: a tight loop of Status calls would compete with the worker it waits for.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let s = client.status().await?;
            let m = s.model(model).unwrap();
            if m.in_flight == 0 && m.cancelled > cancelled0 {
                break (dropped.elapsed(), m.generated_tokens - generated0);
            }
        };
        freed_ms.push(freed.0.as_secs_f64() * 1000.0);
        extra_tokens.push(freed.1.saturating_sub(received) as f64);
        next_ttft_ms.push(first_token_ms(client, model).await?);
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "{{\"model\":\"{model}\",\"cancel_after_tokens\":{after},\"freed_ms_median\":{:.2},\"freed_ms_max\":{:.2},\"tokens_after_drop_median\":{},\"tokens_after_drop_max\":{},\"next_request_first_token_ms_median\":{:.1},\"reps\":{reps}}}",
        median(freed_ms.clone()),
        max(&freed_ms),
        median(extra_tokens.clone()),
        max(&extra_tokens),
        median(next_ttft_ms)
    );
    Ok(())
}
