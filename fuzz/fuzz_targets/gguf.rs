//! libFuzzer target: GGUF header and metadata, then the tokenizer, chat template and footprint built from them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ultd::fuzzing::gguf(data));
