#![no_main]
//! Fuzz target: `ckptconv::fuzzing::scan` on arbitrary bytes (see src/fuzzing/mod.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptconv::fuzzing::scan(data));
