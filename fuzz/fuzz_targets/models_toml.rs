//! libFuzzer target: models.toml parsing and validation, then the router.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ultd::fuzzing::models_toml(data));
