#![no_main]
//! Fuzz target: `ckptconv::fuzzing::zero` on arbitrary bytes (see src/fuzzing/mod.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptconv::fuzzing::zero(data));
