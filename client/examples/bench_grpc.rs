//! gRPC benchmark: the same prompt and decode length as the in-process benchmark, through a running ultd,
//! timed at the client: time to first token, prompt tokens/s (prompt ÷ time to first token), and decode
//! tokens/s between the first and last delta. Median of `--reps`.
//!
//! `cargo run --release -p ult-client --example bench_grpc -- --addr 127.0.0.1:50051 --model smollm2`
#![allow(clippy::unwrap_used)] // a benchmark may unwrap

use std::time::Instant;

use futures::StreamExt;
use ult_client::{Client, GenerateEvent, GenerateRequest};

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
