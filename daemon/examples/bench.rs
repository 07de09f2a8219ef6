//! In-process speed and memory benchmark: loads each model with ult's engine and times a prefill of
//! `--prompt` tokens and `--decode` greedy decode steps (end-of-sequence ignored), `--reps` times; prints
//! the median. `--ids-out DIR` writes the prompt's token ids so a baseline can run the same tokens.
//! `--batch 1,4,16` adds the aggregate decode speed of that many sequences stepping together (each step one
//! decode row per sequence, through the step scheduler, as ultd batches them), and its ratio to one.
//!
//! `cargo run --release -p ultd --example bench -- --device cpu --prompt 128 --decode 64 --reps 3`
#![allow(clippy::unwrap_used)] // a benchmark may unwrap

mod common;
use common::{arg, median};

use std::time::Instant;

use ult_engine::decoder::{LoadedDecoder, StepInput};
use ult_engine::sched::{Scheduler, SchedulerConfig, SeqId};
use ult_engine::solo::Solo;
use ult_engine::{CandleEngine, Engine, ModelKind, ModelSource, PREFILL_CHUNK};

#[global_allocator]
static ALLOC: ultd::alloc::Counting = ultd::alloc::Counting;

/// A text long enough for any prompt length the benchmark asks for.
pub const TEXT: &str = "The history of the lighthouse begins in antiquity, when fires were lit on hilltops to guide \
ships into harbour. The Pharos of Alexandria, built in the third century before our era, stood more than \
one hundred metres tall and was counted among the wonders of the ancient world. Over the following \
centuries, towers of stone and brick rose along the coasts of the Mediterranean, the Atlantic and the \
North Sea. Keepers tended coal fires and later oil lamps, trimming wicks through the night and polishing \
the glass by day. In the nineteenth century the Fresnel lens transformed the craft: a ring of prisms \
gathered the light of a single flame into a beam that could be seen from twenty miles away. Each light \
was given its own character, a pattern of flashes and eclipses, so that a navigator could tell one \
headland from the next. Electricity arrived, then automation, and one by one the keepers left their \
towers. Today most lighthouses run unattended, monitored from afar, yet they still mark the rocks and \
shoals that have claimed so many ships. Their stories endure in the logbooks the keepers kept: storms \
that lasted for days, supply boats that could not land, and the long quiet of winter nights spent \
watching the lamp turn above a dark and restless sea.";

fn main() -> anyhow::Result<()> {
    // SAFETY: first thing in main, before any other thread exists or CUDA is initialised.
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    if let Some(code) = unsafe { ult_engine::cuda_jit::init_process() } {
        std::process::exit(code.into());
    }
    let args: Vec<String> = std::env::args().collect();
    let device = arg(&args, "--device", "cpu");
    let prompt_len: usize = arg(&args, "--prompt", "128").parse()?;
    let decode: usize = arg(&args, "--decode", "64").parse()?;
    let reps: usize = arg(&args, "--reps", "3").parse()?;
    let models_dir = arg(&args, "--models-dir", "models");
    let only = arg(&args, "--models", "smollm2,gemma3");
    let ids_out = arg(&args, "--ids-out", "");
    // CUDA: decode steps to run between cuProfilerStart/Stop, for `ncu --profile-from-start off`.
    let profile_decode: usize = arg(&args, "--profile-decode", "0").parse()?;
    let extra: Vec<(String, String)> = arg(&args, "--gguf", "")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (name, path) = s.split_once('=').unwrap_or((s, s));
            (name.to_string(), path.to_string())
        })
        .collect();
    // `--attention host`: the CPU's block loops instead of the portable Candle ops (see
    // CandleEngine::host_loops).
    let attention = arg(&args, "--attention", "portable");
    let batches: Vec<usize> = arg(&args, "--batch", "")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let opened = Instant::now();
    let engine = if attention == "host" {
        CandleEngine::host_loops(&device)?
    } else {
        CandleEngine::new(&device)?
    };
    let kernels = engine.wait_for_kernels();
    println!(
        "device opened and kernels ready in {:.0} ms (kernel compile {:.0} ms)",
        opened.elapsed().as_secs_f64() * 1000.0,
        kernels.as_secs_f64() * 1000.0
    );
    let mut models: Vec<(String, String)> = vec![
        (
            "smollm2".into(),
            format!("{models_dir}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        (
            "gemma3".into(),
            format!("{models_dir}/gemma3/gemma-3-270m-q4_k_m.gguf"),
        ),
    ];
    models.retain(|(n, _)| only.split(',').any(|o| o == n));
    models.extend(extra);
    let attention_label = if attention == "host" {
        "CPU block loops"
    } else if std::env::var_os("ULT_ATTENTION").is_some_and(|v| v == "portable")
        || !device.starts_with("cuda")
    {
        "portable ops"
    } else {
        "ult's CUDA kernels"
    };
    println!(
        "device {}, attention {attention_label}, prompt {prompt_len} tokens, decode {decode} tokens, median of {reps}",
        engine.device_name()
    );
    println!(
        "{:<10} {:>9} {:>12} {:>12} {:>14} {:>12} {:>12}",
        "model",
        "load ms",
        "prompt tok/s",
        "decode tok/s",
        "host-argmax/s",
        "measured",
        "predicted"
    );
    for (name, path) in models {
        let context = (prompt_len + decode + 16).max(256);
        let source = ModelSource {
            name: name.clone(),
            kind: ModelKind::Completion,
            path: path.into(),
            context: Some(context),
            max_sequences: max_batch as u32,
            chat_template: None,
        };
        let inspection = engine.inspect(&source)?;
        let started = Instant::now();
        let device_before = engine.device_memory();
        let heap_before = ultd::alloc::thread_net_bytes();
        let mut loaded = engine
            .load(&source, &inspection, context, &|_| {})?
            .into_decoder()?;
        let load_ms = started.elapsed().as_secs_f64() * 1000.0;
        let measured = match (device_before, engine.device_memory()) {
            (Some((a, _)), Some((b, _))) => a.saturating_sub(b),
            _ => (ultd::alloc::thread_net_bytes() - heap_before).max(0) as u64,
        };
        let predicted =
            inspection.footprint.steady_bytes() + inspection.footprint.kv_bytes(context as u32);
        // The prompt: the text's tokens, repeated as needed, cut to exactly `prompt_len` (BOS included).
        let mut ids = inspection.tokenizer.encode(TEXT, true);
        while ids.len() < prompt_len {
            let more = inspection.tokenizer.encode(TEXT, false);
            ids.extend(more);
        }
        ids.truncate(prompt_len);
        if !ids_out.is_empty() {
            let joined: Vec<String> = ids.iter().map(u32::to_string).collect();
            std::fs::write(format!("{ids_out}/{name}.ids"), joined.join(","))?;
        }
        let mut batch_rates = Vec::new();
        for &b in &batches {
            let rates: Vec<f64> = (0..reps)
                .map(|_| batch_decode(&mut loaded, &ids, b, decode))
                .collect::<anyhow::Result<_>>()?;
            batch_rates.push((b, median(rates)));
        }
        let mut model = Solo::new(&mut loaded, PREFILL_CHUNK);
        let mut prompt_rates = Vec::new();
        let mut decode_rates = Vec::new();
        for _ in 0..reps {
            // Greedy, as ultd decodes greedy requests: the argmax stays on the device.
            let t = Instant::now();
            let mut next = model.begin_greedy(&ids)?;
            prompt_rates.push(prompt_len as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            for _ in 0..decode {
                next = model.step_greedy(next)?;
            }
            decode_rates.push(decode as f64 / t.elapsed().as_secs_f64());
        }
        // The same decode with every logit copied to the host and the argmax taken there (what sampled
        // requests pay): the difference is the cost of the copy and host-side selection.
        let mut host_rates = Vec::new();
        for _ in 0..reps {
            let mut logits = model.begin(&ids)?;
            let t = Instant::now();
            for _ in 0..decode {
                let next = logits
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i as u32);
                logits = model.step(next)?;
            }
            host_rates.push(decode as f64 / t.elapsed().as_secs_f64());
        }
        if profile_decode > 0 {
            let mut next = model.begin_greedy(&ids)?;
            next = model.step_greedy(next)?;
            #[cfg(feature = "cuda")]
            candle_core::cuda_backend::cudarc::driver::profiler_start()?;
            let t = Instant::now();
            for _ in 0..profile_decode {
                next = model.step_greedy(next)?;
            }
            let per = t.elapsed().as_secs_f64() * 1e6 / profile_decode as f64;
            #[cfg(feature = "cuda")]
            candle_core::cuda_backend::cudarc::driver::profiler_stop()?;
            println!(
                "profiled {profile_decode} decode steps of {name}: {per:.0} us each (wall, under the profiler)"
            );
        }
        let (p, d, h) = (
            median(prompt_rates),
            median(decode_rates),
            median(host_rates),
        );
        println!(
            "{name:<10} {load_ms:>9.0} {p:>12.1} {d:>12.1} {h:>14.1} {:>11.1}M {:>11.1}M",
            measured as f64 / 1048576.0,
            predicted as f64 / 1048576.0
        );
        if let Some(&(b0, r0)) = batch_rates.first() {
            for &(b, r) in &batch_rates {
                println!(
                    "{name:<10} batch {b:>3}: aggregate decode {r:>8.1} tok/s, {:.2}x batch {b0}",
                    r / r0
                );
            }
        }
        println!(
            "{{\"model\":\"{name}\",\"load_ms\":{load_ms:.1},\"prompt_tok_s\":{p:.2},\"decode_tok_s\":{d:.2},\"decode_host_argmax_tok_s\":{h:.2},\"measured_bytes\":{measured},\"predicted_bytes\":{predicted}}}"
        );
    }
    Ok(())
}

/// Aggregate greedy decode tok/s of `batch` sequences of `prompt` stepping together: every sequence is
/// prefilled and has its first token before the clock starts, then `decode` steps each add one token to
/// every sequence.
fn batch_decode(
    model: &mut LoadedDecoder,
    prompt: &[u32],
    batch: usize,
    decode: usize,
) -> anyhow::Result<f64> {
    let layout = model.pool.layout().clone();
    let mut sched = Scheduler::new(SchedulerConfig {
        max_running: batch,
        step_tokens: PREFILL_CHUNK,
        block_tokens: layout.block_tokens,
        context: model.decoder.context(),
        groups: layout.group_configs(model.pool.blocks()),
        prefix_cache: false,
    });
    let mut tokens: Vec<Vec<u32>> = vec![prompt.to_vec(); batch];
    for id in 0..batch {
        sched
            .add(id as SeqId, prompt)
            .map_err(|e| anyhow::anyhow!("sequence {id}: {e:?}"))?;
    }
    // One step; returns how many sequences got a token.
    let mut step = |sched: &mut Scheduler, tokens: &mut Vec<Vec<u32>>| -> anyhow::Result<usize> {
        let plan = sched.schedule();
        anyhow::ensure!(
            plan.stalled.is_empty() && !plan.items.is_empty(),
            "the pool cannot hold {batch} sequences"
        );
        let (rows, next) = {
            let input = StepInput::from_plan(&plan, |id| tokens[id as usize].as_slice());
            let out = model.decoder.forward(&input, &mut model.pool)?;
            (out.rows.clone(), out.argmax()?)
        };
        sched.step_done();
        for (&id, t) in rows.iter().zip(next) {
            tokens[id as usize].push(t);
            sched.push_token(id, t);
        }
        Ok(rows.len())
    };
    let mut started = 0;
    while started < batch {
        started += step(&mut sched, &mut tokens)?;
    }
    let t = Instant::now();
    let mut produced = 0;
    for _ in 0..decode {
        produced += step(&mut sched, &mut tokens)?;
    }
    let rate = produced as f64 / t.elapsed().as_secs_f64();
    for id in 0..batch {
        sched.remove(id as SeqId);
    }
    Ok(rate)
}
