#![no_main]
//! Fuzz target: `ckptconv::fuzzing::safetensors_header` on arbitrary bytes (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptconv::fuzzing::safetensors_header(data));
