//! The fuzz smoke run (CI, stable Rust): every fuzz target in `ultd::fuzzing` over its committed corpus
//! (`fuzz/corpus/<target>/`) and a fixed number of deterministic mutations of it. A panic fails the test and
//! writes the input to `target/fuzz-smoke/<target>-<n>` for `cargo fuzz run <target> <file>`. The long runs
//! are libFuzzer's (`scripts/fuzz.sh`); their figures are in BENCHMARKS.md.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use ult_tests::mutate::Mutator;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!seeds.is_empty(), "empty corpus {}", dir.display());
    seeds
}

/// Executions per target beyond the corpus (ULT_FUZZ_SMOKE_EXECS overrides).
fn execs() -> usize {
    std::env::var("ULT_FUZZ_SMOKE_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn smoke(target: &str, seed: u64, run: impl Fn(&[u8])) {
    let seeds = corpus(target);
    let mut m = Mutator::new(seed);
    let inputs = seeds
        .iter()
        .cloned()
        .chain((0..execs()).map(|_| m.mutate(&seeds)));
    // Panics are caught to name the input; the default hook would print each one first.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut n = 0;
    for (i, input) in inputs.enumerate() {
        n += 1;
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| run(&input))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let dir = root().join("target/fuzz-smoke");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!("{target}-{i}"));
            std::fs::write(&file, &input).unwrap();
            failures.push(format!("{}: {msg}", file.display()));
        }
    }
    std::panic::set_hook(hook);
    eprintln!(
        "fuzz smoke {target}: {n} executions, {} panics",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{target} panicked on:\n{}",
        failures.join("\n")
    );
}

#[test]
fn gguf_header_and_tokenizer_never_panic() {
    smoke("gguf", 1, ultd::fuzzing::gguf);
}

#[test]
fn models_toml_never_panics() {
    smoke("models_toml", 2, ultd::fuzzing::models_toml);
}

#[test]
fn request_validation_never_panics() {
    let target = ultd::fuzzing::RequestTarget::new(&root().join("models")).unwrap();
    smoke("request", 3, |d| target.run(d));
}

/// The GGUF seeds are complete models (with tokenizers and, for one, a chat template), so mutations
/// explore past the header checks instead of failing at the magic.
#[test]
fn gguf_seeds_parse_and_build_tokenizers() {
    use ult_engine::gguf::GgufHeader;
    use ult_engine::tokenizer::Tokenizer;
    for (i, seed) in corpus("gguf").iter().enumerate() {
        let header = GgufHeader::parse(
            &mut std::io::Cursor::new(seed),
            seed.len() as u64,
            Path::new("seed.gguf"),
        )
        .unwrap_or_else(|e| panic!("seed {i}: {e}"));
        let tokenizer = Tokenizer::from_gguf(&header.vocab).unwrap();
        assert!(
            tokenizer.encode("hello world", false).len() >= 2,
            "seed {i}"
        );
    }
}
