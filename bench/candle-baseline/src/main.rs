//! Baseline for ult's benchmarks: raw candle-transformers 0.11.1 (`quantized_llama`, `quantized_gemma3`)
//! timing a prefill of the given token ids and greedy decode steps, median of `reps`.
//!
//! `candle-baseline ARCH FILE.gguf IDS_FILE DECODE REPS [cpu|cuda]`
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{D, Device, Tensor};

enum Model {
    Llama(candle_transformers::models::quantized_llama::ModelWeights),
    Gemma(candle_transformers::models::quantized_gemma3::ModelWeights),
}

impl Model {
    fn forward(&mut self, x: &Tensor, pos: usize) -> Tensor {
        match self {
            Self::Llama(m) => m.forward(x, pos).unwrap(),
            Self::Gemma(m) => m.forward(x, pos).unwrap(),
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (arch, path, ids_file) = (&a[1], &a[2], &a[3]);
    let decode: usize = a[4].parse().unwrap();
    let reps: usize = a[5].parse().unwrap();
    let device = if a.get(6).map(String::as_str) == Some("cuda") { Device::new_cuda(0).unwrap() } else { Device::Cpu };
    let ids: Vec<u32> = std::fs::read_to_string(ids_file).unwrap().trim().split(',').map(|s| s.parse().unwrap()).collect();
    let started = Instant::now();
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut model = match arch.as_str() {
        "gemma3" => Model::Gemma(candle_transformers::models::quantized_gemma3::ModelWeights::from_gguf(content, &mut file, &device).unwrap()),
        _ => Model::Llama(candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &device).unwrap()),
    };
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (mut prompt_rates, mut decode_rates) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        // A fresh sequence at position 0 overwrites the KV cache positions the last one used.
        let t = Instant::now();
        let x = Tensor::new(ids.as_slice(), &device).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&x, 0);
        let mut next = logits.argmax(D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap()[0];
        prompt_rates.push(ids.len() as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for i in 0..decode {
            let x = Tensor::new(&[next], &device).unwrap().unsqueeze(0).unwrap();
            let logits = model.forward(&x, ids.len() + i);
            next = logits.argmax(D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap()[0];
        }
        decode_rates.push(decode as f64 / t.elapsed().as_secs_f64());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{{\"arch\":\"{arch}\",\"load_ms\":{load_ms:.1},\"prompt_tok_s\":{:.2},\"decode_tok_s\":{:.2}}}",
        median(prompt_rates),
        median(decode_rates)
    );
}
