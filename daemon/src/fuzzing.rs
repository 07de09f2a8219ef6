//! Fuzz entry points: every parser that reads bytes ult does not control, as a function that must return
//! (never panic, never abort) whatever the input. `fuzz/` drives them with libFuzzer (`scripts/fuzz.sh`);
//! `tests/tests/fuzz_smoke.rs` drives the same functions on stable Rust over the committed corpus plus
//! deterministic mutations, in CI.
//!
//! Targets: [`gguf`] (GGUF header and metadata, then the tokenizer and chat template built from them, then
//! the footprint prediction), [`models_toml`] (models.toml parsing and validation, then the router), and
//! [`RequestTarget`] (a generation request decoded from bytes, validated against a real model: template
//! rendering, tokenization, sampling and stop-sequence checks).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::generation::{GenerateRequest, Input, prepare_generation};
use crate::registry::{RegisteredModel, Registry};
use ult_engine::CandleEngine;
use ult_engine::gguf::GgufHeader;
use ult_engine::sampler::SamplingParams;
use ult_engine::template::{ChatMessage, ChatTemplate};
use ult_engine::tokenizer::Tokenizer;

/// Text that exercises special tokens, multi-byte characters and byte fallback.
const PROBE_TEXT: &str = "<|im_start|>user\nHello wörld 🦀 <0x0A>\t  x<|im_end|>";

/// Parses `data` as a GGUF file; when it parses, builds its tokenizer and chat template and predicts its
/// footprint, as `ultd` does when it inspects a model.
pub fn gguf(data: &[u8]) {
    let Ok(header) = GgufHeader::parse(
        &mut Cursor::new(data),
        data.len() as u64,
        Path::new("fuzz.gguf"),
    ) else {
        return;
    };
    for context in [1, 512, header.hparams.trained_context] {
        let _ = header.footprint(context, 1, true);
        let _ = header.footprint(context, 4, false);
    }
    let _ = header.weights_bytes();
    let Ok(tokenizer) = Tokenizer::from_gguf(&header.vocab) else {
        return;
    };
    let ids = tokenizer.encode(PROBE_TEXT, true);
    let _ = tokenizer.decode(&ids);
    for id in ids.iter().take(64) {
        let _ = tokenizer.piece_text(*id);
    }
    if let Some(src) = &header.chat_template
        && let Ok(t) = ChatTemplate::new(src, "<s>".into(), "</s>".into())
    {
        let _ = t.render(&[ChatMessage::new("user", "hi")], true);
    }
}

/// Parses `data` as models.toml text; when it parses, builds the router.
pub fn models_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(Path::new("/nonexistent/fuzz/models.toml"), text) {
        Ok(config) => {
            let _ = config.router();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Generation requests against one real model (inspected once; inspection reads the file's header only).
pub struct RequestTarget {
    model: Arc<RegisteredModel>,
}

impl RequestTarget {
    /// Inspects the SmolLM2 chat model under `models_dir` (the directory `scripts/fetch-models.sh` fills).
    pub fn new(models_dir: &Path) -> Result<Self, String> {
        let models_dir = std::fs::canonicalize(models_dir)
            .map_err(|e| format!("{}: {e}", models_dir.display()))?;
        let path: PathBuf = models_dir.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        let text = format!(
            "[daemon]\nstate_file = \"off\"\n[models.smollm2]\npath = {:?}\nkind = \"chat\"\ncontext = 256\n",
            path.display().to_string()
        );
        let config =
            Config::parse(&models_dir.join("models.toml"), &text).map_err(|e| e.to_string())?;
        let engine = CandleEngine::new("cpu").map_err(|e| e.to_string())?;
        let registry = Registry::inspect(&config, &engine);
        let model = registry
            .models
            .get("smollm2")
            .cloned()
            .ok_or("smollm2 not registered")?;
        if let Err(e) = &model.inspection {
            return Err(e.clone());
        }
        Ok(Self { model })
    }

    /// Decodes `data` into a request (see [`decode_request`]) and validates it against the model.
    pub fn run(&self, data: &[u8]) {
        let (input, max_tokens, sampling, stop) = decode_request(data);
        let req = GenerateRequest {
            max_tokens,
            sampling,
            stop,
            ..GenerateRequest::new("smollm2", input)
        };
        if let Ok(p) = prepare_generation(&self.model, &req) {
            // A request that passes validation fits the context it was checked against.
            let context = self
                .model
                .inspection
                .as_ref()
                .map_or(usize::MAX, |i| i.context);
            assert!(
                p.prompt.len() < context,
                "a validated prompt of {} tokens exceeds the context of {context}",
                p.prompt.len()
            );
        }
    }
}

/// Reads a little-endian number from the front of `data`, advancing it; zero when `data` runs out.
fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = N.min(data.len());
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

/// A request from bytes: a flags byte; max_tokens (u32); temperature, top_p, repetition penalty (f32
/// bit patterns, so NaN and infinities occur); top_k (u16); then NUL-separated strings — with the
/// messages flag, pairs of role and content, otherwise the prompt first — where strings starting with
/// `\x01` are stop sequences.
pub fn decode_request(mut data: &[u8]) -> (Input, Option<u32>, SamplingParams, Vec<String>) {
    let [flags] = take::<1>(&mut data);
    let max_tokens = u32::from_le_bytes(take(&mut data));
    let temperature = f32::from_le_bytes(take(&mut data));
    let top_p = f32::from_le_bytes(take(&mut data));
    let penalty = f32::from_le_bytes(take(&mut data));
    let top_k = u16::from_le_bytes(take(&mut data));
    let sampling = SamplingParams {
        temperature,
        top_k: (flags & 2 != 0).then_some(usize::from(top_k)),
        top_p: (flags & 4 != 0).then_some(top_p),
        min_p: None,
        repetition_penalty: if flags & 8 != 0 { penalty } else { 1.0 },
        repeat_last_n: 64,
        seed: Some(u64::from(flags)),
    };
    let text = String::from_utf8_lossy(data);
    let (stop, parts): (Vec<&str>, Vec<&str>) =
        text.split('\0').partition(|s| s.starts_with('\u{1}'));
    let stop = stop.into_iter().map(|s| s[1..].to_string()).collect();
    let input = if flags & 1 != 0 {
        Input::Messages(
            parts
                .chunks(2)
                .map(|c| {
                    ChatMessage::new(
                        c[0].to_string(),
                        c.get(1).copied().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
        )
    } else {
        Input::Prompt(parts.concat())
    };
    let max_tokens = (flags & 16 != 0).then_some(max_tokens);
    (input, max_tokens, sampling, stop)
}
