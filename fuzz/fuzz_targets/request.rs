//! libFuzzer target: generation requests validated against the real SmolLM2 model (run from the repository
//! root after scripts/fetch-models.sh, or set ULT_MODELS_DIR).
#![no_main]
use std::sync::OnceLock;

static TARGET: OnceLock<ultd::fuzzing::RequestTarget> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let target = TARGET.get_or_init(|| {
        let dir = std::env::var("ULT_MODELS_DIR").unwrap_or_else(|_| "models".into());
        ultd::fuzzing::RequestTarget::new(std::path::Path::new(&dir)).expect("the SmolLM2 model")
    });
    target.run(data);
});
