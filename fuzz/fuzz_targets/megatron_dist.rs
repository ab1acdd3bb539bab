#![no_main]
//! Fuzz target: `ckptconv::fuzzing::megatron_dist` on arbitrary bytes (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptconv::fuzzing::megatron_dist(data));
