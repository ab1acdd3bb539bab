#![no_main]
//! Fuzz target: `ckptconv::fuzzing::megatron_moe` on arbitrary bytes (see src/fuzzing/mod.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptconv::fuzzing::megatron_moe(data));
