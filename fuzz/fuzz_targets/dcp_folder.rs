#![no_main]
//! Fuzz target: `ckptconv::fuzzing::dcp_folder` on arbitrary bytes (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| ckptconv::fuzzing::dcp_folder(data));
