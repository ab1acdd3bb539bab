#![no_main]
//! Fuzz target: `ckptconv::fuzzing::pickle_policy`, the allowlist classifier against a generator's own verdict
//! (see src/fuzzing/classifier.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptconv::fuzzing::pickle_policy(data));
