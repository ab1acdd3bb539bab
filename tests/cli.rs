//! End-to-end checks of the `ckptconv` binary that need no Python: exit codes, hostile inputs and
//! determinism. Tensor-for-tensor equality against torch lives in tests/e2e (pytest).

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ckptconv"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn outputs_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn every_hostile_input_fails_cleanly_and_leaves_nothing() {
    // The file-shaped part of the hostile corpus (tests/hostile/corpus.py; pytest runs all of it, folders too).
    let dir = fixtures().parent().unwrap().join("hostile");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let cases = expected.as_object().unwrap();
    let mut checked = 0;
    for (file, case) in cases {
        if file.starts_with('_') {
            continue;
        }
        let input = dir.join(file);
        let out = tempfile::tempdir().unwrap();
        let res = bin().arg("convert").arg(&input).arg(out.path()).output().unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr).to_lowercase();
        assert_eq!(res.status.code(), Some(1), "{file}: expected exit 1, stderr: {stderr}");
        let wants: Vec<String> =
            case["expect"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_lowercase()).collect();
        assert!(wants.iter().any(|w| stderr.contains(w)), "{file}: stderr {stderr:?} has none of {wants:?}");
        let kind = case["kind"].as_str().unwrap();
        assert!(stderr.contains(&format!("ckptconv: error[{kind}]: ")), "{file}: expected kind {kind}: {stderr}");
        assert!(stderr.contains(&file.to_lowercase()), "{file}: stderr does not name the file: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "{file}: {stderr}");
        let left = outputs_in(out.path());
        assert!(left.is_empty(), "{file}: left files behind: {left:?}");
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} hostile cases found");
}

#[test]
fn usage_errors_exit_2_and_missing_input_exits_1() {
    let res = bin().args(["convert", "--no-such-flag"]).output().unwrap();
    assert_eq!(res.status.code(), Some(2));
    let res = bin().args(["convert", "x.pt", "out", "--dtype", "int4"]).output().unwrap();
    assert_eq!(res.status.code(), Some(2));
    let out = tempfile::tempdir().unwrap();
    let res = bin().arg("convert").arg("/definitely/not/here.pt").arg(out.path()).output().unwrap();
    assert_eq!(res.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&res.stderr).contains("/definitely/not/here.pt"));
}

#[test]
fn conversion_is_deterministic_and_refuses_to_overwrite() {
    let input = fixtures().join("pt/qwen2_tiny_full_weights.pt");
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [&a, &b] {
        let res = bin().arg("convert").arg(&input).arg(d.path()).args(["--max-shard-size", "30KB"]).output().unwrap();
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    }
    let mut names = outputs_in(a.path());
    names.sort();
    assert!(names.len() > 2, "expected shards plus an index, got {names:?}");
    assert_eq!(names, {
        let mut n = outputs_in(b.path());
        n.sort();
        n
    });
    for n in &names {
        assert_eq!(std::fs::read(a.path().join(n)).unwrap(), std::fs::read(b.path().join(n)).unwrap(), "{n}");
    }
    let res = bin().arg("convert").arg(&input).arg(a.path()).args(["--max-shard-size", "30KB"]).output().unwrap();
    assert_eq!(res.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&res.stderr).contains("--force"));
}

#[test]
fn inspect_lists_tensors_as_json() {
    let input = fixtures().join("pt/qwen2_tiny_full_weights.pt");
    let res = bin().arg("inspect").arg(&input).arg("--json").output().unwrap();
    assert!(res.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    let tensors = doc["tensors"].as_array().unwrap();
    assert!(tensors.iter().any(|t| t["name"] == "model.embed_tokens.weight"));
    let sum: u64 = tensors.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    assert_eq!(doc["total_bytes"].as_u64().unwrap(), sum);
}

#[test]
fn a_reader_that_stops_early_is_not_a_crash() {
    use std::process::Stdio;
    let input = fixtures().join("pt/qwen2_tiny_full_weights.pt");
    // `ckptconv inspect X | head -1`: standard output is closed before the report is written.
    for json in [false, true] {
        let mut cmd = bin();
        cmd.arg("inspect").arg(&input);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let res = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(0), "inspect (json {json}) with stdout closed: {stderr}");
        assert!(!stderr.contains("internal error"), "{stderr}");
    }
    // `ckptconv convert X OUT 2>&1 | head -1`: standard error is closed; the conversion still completes.
    let out = tempfile::tempdir().unwrap();
    let mut child =
        bin().arg("convert").arg(&input).arg(out.path()).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "convert with stderr closed");
    let mut written = outputs_in(out.path());
    written.sort();
    assert_eq!(written, ["model.safetensors"]);
}
