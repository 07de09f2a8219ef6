//! Tokenizer fixtures: ult's tokenizers against ids produced by independent implementations
//! (transformers for the gpt2 vocabulary, sentencepiece for the llama vocabulary, tokenizers for BERT;
//! see scripts/tokenizer-fixtures.py), on chat tags, digits, tabs, non-ASCII text and emoji.
#![allow(clippy::unwrap_used)] // tests and examples may unwrap

use std::path::PathBuf;

use ult_engine::gguf::GgufHeader;
use ult_engine::tokenizer::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn models() -> PathBuf {
    std::env::var_os("ULT_MODELS_DIR").map_or_else(|| root().join("models"), PathBuf::from)
}

fn check(tokenizer: &Tokenizer, fixture: &str) {
    let path = root().join("engine/tests/fixtures/tokenizer").join(fixture);
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut failures = Vec::new();
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tokenizer.encode(text, tokenizer.kind() == "wordpiece");
        if got != expected {
            failures.push(format!(
                "{text:?}\n  expected {expected:?}\n  got      {got:?}"
            ));
        }
        // Decoding gives the text back for the byte-level and SentencePiece vocabularies (control tokens
        // render as nothing).
        if tokenizer.kind() != "wordpiece" && !text.contains('<') {
            assert_eq!(tokenizer.decode(&got), text, "round trip");
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.as_array().unwrap().len(),
        failures.join("\n")
    );
}

fn gguf_tokenizer(file: &str) -> Tokenizer {
    let path = models().join(file);
    let header =
        GgufHeader::read(&path).unwrap_or_else(|e| panic!("{e} (run scripts/fetch-models.sh)"));
    Tokenizer::from_gguf(&header.vocab).unwrap()
}

#[test]
fn smollm2_gpt2_vocabulary_matches_transformers() {
    let t = gguf_tokenizer("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(t.kind(), "gpt2");
    check(&t, "smollm2.json");
    // ChatML tags are single tokens and end generation.
    assert_eq!(t.encode("<|im_end|>", false), vec![2]);
    assert!(t.is_stop(2));
}

#[test]
fn gemma3_sentencepiece_vocabulary_matches_sentencepiece() {
    let t = gguf_tokenizer("gemma3/gemma-3-270m-q4_k_m.gguf");
    assert_eq!(t.kind(), "llama");
    check(&t, "gemma3.json");
    assert_eq!(t.encode("Hi", true)[0], 2, "Gemma adds BOS");
    assert!(t.is_stop(106), "<end_of_turn> ends generation");
}

#[test]
fn minilm_wordpiece_matches_tokenizers() {
    let t = Tokenizer::from_bert_json(&models().join("minilm/tokenizer.json")).unwrap();
    check(&t, "minilm.json");
}

/// Byte-level BPE from model folders' tokenizer.json (scripts/mlx/gen-checkpoints.py: SmolLM2's vocabulary
/// behind three real pre-tokenizer dialects) against the tokenizers library's ids; each mlx_lm.convert copy
/// (re-serialised by transformers, merges as pairs) must tokenize the same.
#[test]
fn tokenizer_json_folders_match_tokenizers() {
    for (family, converted) in [
        ("llama", "mlx-llama-q4"),
        ("qwen3", "mlx-qwen3-q4"),
        ("qwen3moe", "mlx-qwen3moe-q4"),
    ] {
        for dir in [format!("hf-{family}"), converted.to_string()] {
            let path = models().join("mlx").join(&dir);
            let t = Tokenizer::from_dir(&path)
                .unwrap_or_else(|e| panic!("{e} (run scripts/mlx/make-checkpoints.sh)"));
            assert_eq!(t.kind(), "gpt2");
            check(&t, &format!("hf-{family}.json"));
            assert_eq!(t.encode("<|im_end|>", false), vec![2], "{dir}");
            assert!(t.is_stop(2), "{dir}: <|im_end|> ends generation");
            // Llama 3's post-processor puts the BOS first; the others add none.
            assert_eq!(t.encode("Hi", true)[0] == 1, family == "llama", "{dir}");
        }
    }
}

/// Bounded encoding gives exactly the full encoding when it fits, and otherwise stops past the limit
/// (or refuses unread a text too long for any count of tokens under it), on all three real vocabularies.
#[test]
fn bounded_encoding_stops_past_the_limit() {
    let tokenizers = [
        gguf_tokenizer("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        gguf_tokenizer("gemma3/gemma-3-270m-q4_k_m.gguf"),
        Tokenizer::from_bert_json(&models().join("minilm/tokenizer.json")).unwrap(),
    ];
    let text = "The quick brown fox jumps over the lazy dog; 12345 <b>émoji 🦊</b>\n".repeat(40);
    for t in &tokenizers {
        let full = t.encode(&text, true);
        assert_eq!(t.encode_limited(&text, true, full.len()).unwrap(), full);
        let limit = full.len() / 2;
        let e = t.encode_limited(&text, true, limit).unwrap_err();
        assert_eq!(e.limit, limit);
        assert!(e.at_least > limit, "{e:?}");
        // A 3 MB text against an 8k context is refused from its length alone.
        let huge = "a".repeat(3 << 20);
        let e = t.encode_limited(&huge, true, 8192).unwrap_err();
        assert!(e.at_least > 8192);
        assert!(t.max_bytes_for(8192) < huge.len(), "{}", t.kind());
    }
}
