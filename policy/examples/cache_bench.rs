//! Residency policies on simulated traces: ult's governor (GDSF), LRU, Ollama's rule and Belady, against
//! the FOO-L lower bound (Berger et al. 2018). A 512 GB machine with a 440 GB ceiling and a zoo of 0.4 GB
//! to 350 GB models; Zipf, bursty and phase-shifting popularity; five seeds each.
//!
//! `cargo run --release -p ult-policy --example cache_bench`
#![allow(clippy::unwrap_used)] // a benchmark may unwrap

use ult_policy::sim::{
    Belady, Lru, OllamaRule, SimModel, SimPolicy, TraceShape, UltPolicy, exact_optimum,
    foo_lower_bound, generate, simulate,
};

const GB: f64 = 1e9;
const BANDWIDTH: f64 = 5e9; // bytes/s: a fast NVMe reading GGUF files

fn zoo() -> Vec<SimModel> {
    [
        ("embed-minilm", 0.4),
        ("smollm2-1.7b", 1.1),
        ("llama3.2-3b", 2.0),
        ("qwen3-8b", 5.0),
        ("gemma3-12b", 8.1),
        ("qwen3-14b", 9.3),
        ("gemma3-27b", 17.0),
        ("qwen3-32b", 20.0),
        ("qwen2.5-coder-32b", 20.0),
        ("llama3.3-70b", 43.0),
        ("qwen3-235b-a22b", 142.0),
        ("qwen3-coder-480b", 350.0),
    ]
    .into_iter()
    .map(|(name, gb)| SimModel {
        name: name.into(),
        bytes: (gb * GB) as u64,
    })
    .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--requests")
        .and_then(|i| args.get(i + 1))
        .map_or(3000, |v| v.parse().unwrap());
    let seeds: u64 = args
        .iter()
        .position(|a| a == "--seeds")
        .and_then(|i| args.get(i + 1))
        .map_or(5, |v| v.parse().unwrap());
    let capacity = (440.0 * GB) as u64;
    let shapes = [
        ("zipf s=0.8", TraceShape::Zipf { s: 0.8 }),
        ("zipf s=1.0", TraceShape::Zipf { s: 1.0 }),
        ("zipf s=1.2", TraceShape::Zipf { s: 1.2 }),
        (
            "bursty (mean 6)",
            TraceShape::Bursty {
                s: 1.0,
                mean_burst: 6.0,
            },
        ),
        (
            "phase-shifting (4)",
            TraceShape::PhaseShifting { s: 1.0, phases: 4 },
        ),
    ];
    println!(
        "{n} requests per trace, {seeds} seeds, 440 GB ceiling, loads at 5 GB/s; bytes in TB, summed over seeds"
    );
    println!(
        "{:<20} {:<18} {:>10} {:>9} {:>8} {:>10}",
        "trace", "policy", "loaded TB", "×optimum", "hits", "stall h"
    );
    for (label, shape) in shapes {
        let mut totals: Vec<(String, f64, f64, f64)> = Vec::new();
        let mut bound_total = 0.0;
        let mut optimum_total = 0.0;
        for seed in 1..=seeds {
            let trace = generate(zoo(), shape, n, 30_000.0, seed);
            bound_total += foo_lower_bound(&trace, capacity, 1 << 20) as f64;
            optimum_total += exact_optimum(&trace, capacity).unwrap() as f64;
            let hl: Option<u64> = std::env::var("HALF_LIFE_H")
                .ok()
                .and_then(|v| v.parse().ok());
            let ult = match hl {
                Some(h) => UltPolicy::with_half_life(capacity, &trace, BANDWIDTH, h * 3_600_000),
                None => UltPolicy::new(capacity, &trace, BANDWIDTH),
            };
            let mut policies: Vec<Box<dyn SimPolicy>> = vec![
                Box::new(ult),
                Box::new(Lru::new(capacity)),
                Box::new(OllamaRule::new(capacity, trace.models.len())),
                Box::new(Belady::new(capacity, &trace)),
            ];
            for (i, p) in policies.iter_mut().enumerate() {
                let o = simulate(&trace, p.as_mut(), BANDWIDTH);
                if totals.len() <= i {
                    totals.push((p.name(), 0.0, 0.0, 0.0));
                }
                totals[i].1 += o.bytes_loaded as f64;
                totals[i].2 += o.hits as f64 / (n as f64 * seeds as f64);
                totals[i].3 += o.stall_s;
            }
        }
        println!(
            "{label:<20} {:<18} {:>10.2} {:>9.2} {:>8} {:>10}",
            "FOO-L lower bound",
            bound_total / 1e12,
            bound_total / optimum_total,
            "",
            ""
        );
        println!(
            "{label:<20} {:<18} {:>10.2} {:>9.2} {:>8} {:>10}",
            "optimum (exact DP)",
            optimum_total / 1e12,
            1.0,
            "",
            ""
        );
        for (name, bytes, hits, stall) in &totals {
            println!(
                "{label:<20} {name:<18} {:>10.2} {:>9.2} {:>7.1}% {:>10.1}",
                bytes / 1e12,
                bytes / optimum_total,
                hits * 100.0,
                stall / 3600.0
            );
        }
        let ult = totals[0].1;
        println!(
            "{label:<20} ult vs LRU {:+.0}% bytes, vs Ollama rule {:+.0}% bytes",
            (ult / totals[1].1 - 1.0) * 100.0,
            (ult / totals[2].1 - 1.0) * 100.0
        );
    }
}
