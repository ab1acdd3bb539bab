#![no_main]
//! Fuzz target: `ckptconv::fuzzing::hf_set` on arbitrary bytes (see src/fuzzing/mod.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptconv::fuzzing::hf_set(data));
