//! Replays every saved fuzz input (seed corpora and regression crash files under fuzz/) through the same
//! entry points the fuzz targets use, so a fixed crash stays fixed in the ordinary test run.

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("pickle", ckptconv::fuzzing::pickle),
    ("pickle_policy", ckptconv::fuzzing::pickle_policy),
    ("torch_file", ckptconv::fuzzing::torch_file),
    ("dcp_metadata", ckptconv::fuzzing::dcp_metadata),
    ("dcp_folder", ckptconv::fuzzing::dcp_folder),
    ("megatron", ckptconv::fuzzing::megatron),
    ("megatron_dist", ckptconv::fuzzing::megatron_dist),
    ("megatron_moe", ckptconv::fuzzing::megatron_moe),
    ("safetensors_header", ckptconv::fuzzing::safetensors_header),
    ("hf_set", ckptconv::fuzzing::hf_set),
    ("zero", ckptconv::fuzzing::zero),
    ("scan", ckptconv::fuzzing::scan),
];

#[test]
fn every_saved_fuzz_input_is_handled_without_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, target) in TARGETS {
        for kind in ["corpus", "regressions"] {
            let dir = root.join(kind).join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).unwrap();
                target(&data);
                replayed += 1;
            }
        }
    }
    assert!(replayed >= TARGETS.len() * 3, "only {replayed} fuzz inputs found under fuzz/corpus and fuzz/regressions");
}
