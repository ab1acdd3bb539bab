//! `verify`: re-reads a written output folder and checks it, structurally or against its input.
//!
//! The structural check reads every safetensors header (dtypes known, offsets contiguous, data ending
//! exactly at the end of the file) and the index (every entry names an existing file that holds the
//! tensor, `total_size` equals the tensor bytes). The full check also re-derives every tensor from the
//! input's plan and compares the bytes band by band, in bounded memory, so a single flipped bit is found.

use crate::error::{Error, ErrorKind, Result, some_names};
use crate::io::{Folder, Input};
use crate::plan::{BandBuffers, Plan};
use crate::safetensors_header::{self, TensorEntry};
use crate::write::safetensors::INDEX_NAME;
use std::collections::BTreeMap;

/// What a verification covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// safetensors files read.
    pub files: usize,
    /// Tensors found.
    pub tensors: usize,
    /// Tensor bytes covered.
    pub bytes: u64,
    /// Tensor bytes compared with the input (0 for a structural check).
    pub compared: u64,
}

/// Where a tensor sits in the output.
struct Located {
    file: String,
    dtype: crate::dtype::DType,
    shape: Vec<u64>,
    start: u64,
}

fn bad(msg: String) -> Error {
    Error::new(ErrorKind::Verify(msg))
}

/// A shard whose header cannot be read is a failed verification of that shard (not "not a checkpoint").
fn unreadable(e: Error, file: &str) -> Error {
    match e.kind() {
        ErrorKind::Io(_) => e,
        ErrorKind::NotCheckpoint(m) => bad(m.clone()).in_file(file),
        k => bad(k.to_string()).in_file(file),
    }
}

/// Reads the headers (and index) of the safetensors files in `folder` (or its `sub` folder).
fn locate_all(folder: &dyn Folder, sub: &str) -> Result<(BTreeMap<String, Located>, VerifyReport)> {
    let prefix = if sub.is_empty() { String::new() } else { format!("{sub}/") };
    let files = folder.files();
    let index_name = format!("{prefix}{INDEX_NAME}");
    let mut shards: Vec<String> = files
        .iter()
        .filter(|f| f.strip_prefix(&prefix).is_some_and(|r| !r.contains('/') && r.ends_with(".safetensors")))
        .cloned()
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(bad(format!("no .safetensors files in {}/{sub}", folder.name())).in_file(folder.name()));
    }
    let mut found = BTreeMap::new();
    let mut report = VerifyReport::default();
    for f in &shards {
        let input = folder.open(f)?;
        let header = safetensors_header::read_file(&input).map_err(|e| unreadable(e, &input.name))?;
        let data_start = header.data_start;
        report.files += 1;
        for (name, TensorEntry { dtype, shape, offsets: [a, b] }) in header.tensors {
            report.tensors += 1;
            report.bytes += b - a;
            let file = f.clone();
            if let Some(prev) =
                found.insert(name.clone(), Located { file: file.clone(), dtype, shape, start: data_start + a })
            {
                return Err(bad(format!("tensor '{name}' is in both {} and {file}", prev.file)).in_file(&input.name));
            }
        }
    }
    if files.contains(&index_name) {
        let input = folder.open(&index_name)?;
        let in_index = |msg: String| bad(msg).in_file(&input.name);
        if input.len() > 256 << 20 {
            return Err(in_index(format!("{} bytes is too large for an index", input.len())));
        }
        let bytes = input.read_vec(0, input.len())?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| in_index(format!("not JSON: {e}")))?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| in_index("no weight_map".into()))?;
        for (name, file) in map {
            let file = file.as_str().unwrap_or("");
            match found.get(name) {
                Some(l) if l.file == format!("{prefix}{file}") => {}
                Some(l) => return Err(in_index(format!("weight_map puts '{name}' in {file} but it is in {}", l.file))),
                None => return Err(in_index(format!("weight_map lists '{name}' in {file}, which does not hold it"))),
            }
        }
        if map.len() != found.len() {
            let unlisted: Vec<&String> = found.keys().filter(|k| !map.contains_key(*k)).collect();
            return Err(in_index(format!(
                "weight_map leaves out {} tensor(s) of the shards: {}",
                unlisted.len(),
                some_names(&unlisted, 5)
            )));
        }
        match v.get("metadata").and_then(|m| m.get("total_size")).and_then(|t| t.as_u64()) {
            Some(total) if total == report.bytes => {}
            Some(total) => {
                return Err(in_index(format!("total_size is {total} but the tensors hold {} bytes", report.bytes)));
            }
            None => return Err(in_index("no metadata.total_size".into())),
        }
    } else if shards.len() > 1 {
        return Err(bad(format!("{} shards but no {INDEX_NAME}", shards.len())).in_file(folder.name()));
    }
    Ok((found, report))
}

/// Checks the structure of the safetensors output in `folder` (`sub`: a subfolder such as `lora_adapter`).
pub fn structural(folder: &dyn Folder, sub: &str) -> Result<VerifyReport> {
    locate_all(folder, sub).map(|(_, r)| r)
}

/// Checks the output against the plan that produced it: same names, dtypes and shapes, and the same bytes,
/// compared band by band.
pub fn against(folder: &dyn Folder, sub: &str, plan: &Plan, inputs: &[Input]) -> Result<VerifyReport> {
    let (found, mut report) = locate_all(folder, sub)?;
    let wanted: std::collections::BTreeSet<&String> = plan.tensors.iter().map(|t| &t.name).collect();
    let extra: Vec<&String> = found.keys().filter(|k| !wanted.contains(k)).collect();
    let missing: Vec<&String> = wanted.iter().copied().filter(|k| !found.contains_key(*k)).collect();
    if !extra.is_empty() || !missing.is_empty() {
        let mut msg = format!("the output holds {} tensors, the input gives {}", found.len(), plan.tensors.len());
        if !missing.is_empty() {
            msg += &format!("; missing from the output: {}", some_names(&missing, 5));
        }
        if !extra.is_empty() {
            msg += &format!("; not from the input: {}", some_names(&extra, 5));
        }
        return Err(bad(msg).in_file(format!("{}/{sub}", folder.name()).trim_end_matches('/')));
    }
    let mut bufs = BandBuffers::default();
    let (mut want, mut got) = (Vec::new(), Vec::new());
    let mut open: Option<(String, Input)> = None;
    for t in &plan.tensors {
        let l = found
            .get(&t.name)
            .ok_or_else(|| bad(format!("tensor '{}' is missing from the output", t.name)).in_file(folder.name()))?;
        if open.as_ref().is_none_or(|(f, _)| *f != l.file) {
            open = Some((l.file.clone(), folder.open(&l.file)?));
        }
        let Some((_, out)) = &open else { continue };
        if l.dtype != t.dtype || l.shape != t.shape {
            return Err(bad(format!(
                "tensor '{}' is {} {:?} here but {} {:?} from the input",
                t.name,
                l.dtype.safetensors_name(),
                l.shape,
                t.dtype.safetensors_name(),
                t.shape
            ))
            .in_file(&out.name));
        }
        let esz = t.dtype.size() as u64;
        let step = t.band_elems();
        let mut start = 0;
        while start < t.numel() {
            let n = step.min(t.numel() - start);
            crate::plan::fit(&mut want, (n * esz) as usize);
            crate::plan::fit(&mut got, (n * esz) as usize);
            t.read_band(inputs, start, n, &mut want, &mut bufs)?;
            out.read_exact_at(l.start + start * esz, &mut got)?;
            if want != got {
                let first = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(0) as u64;
                return Err(bad(format!(
                    "tensor '{}' differs from the input at element {} (byte {} of {})",
                    t.name,
                    start + first / esz,
                    l.start + start * esz + first,
                    l.file
                ))
                .in_file(&out.name));
            }
            start += n;
        }
        t.release(inputs);
        report.compared += t.nbytes();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::io::MemoryFolder;
    use crate::planned::{PlanOptions, Planned};
    use crate::torch::plan as plan_torch_file;
    use crate::write::{MemorySink, Sink, safetensors};

    /// Written by torch (tests/fixtures/make_pt_fixtures.py): 27 f32 tensors of a tiny Qwen2.
    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pt/qwen2_tiny_full_weights.pt");

    fn planned(dtype: Option<DType>) -> Planned {
        let input = Input::new("qwen2_tiny_full_weights.pt", Box::new(std::fs::read(FIXTURE).unwrap()));
        plan_torch_file(input, &PlanOptions { dtype, ..Default::default() }).unwrap()
    }

    /// The fixture converted in memory into shards of at most 20 kB plus an index, as the CLI writes them.
    fn converted() -> (Planned, MemoryFolder) {
        let p = planned(None);
        let layout = safetensors::layout(&p.plan, Some(20_000)).unwrap();
        let mut sink = MemorySink::default();
        safetensors::write(&p.plan, &layout, &p.inputs, &mut sink, &mut |_| {}).unwrap();
        sink.commit().unwrap();
        assert!(sink.files.len() > 3, "the test wants several shards");
        (p, MemoryFolder { name: "out".into(), files: sink.files })
    }

    fn index(out: &MemoryFolder) -> serde_json::Value {
        serde_json::from_slice(&out.files[INDEX_NAME]).unwrap()
    }

    fn set_index(out: &mut MemoryFolder, v: &serde_json::Value) {
        out.files.insert(INDEX_NAME.into(), serde_json::to_vec(v).unwrap());
    }

    /// Runs the full check and returns its error: label, file and message.
    fn refused(p: &Planned, out: &MemoryFolder) -> (String, String, String) {
        let e = against(out, "", &p.plan, &p.inputs).unwrap_err();
        (e.label().to_string(), e.file().unwrap_or("").to_string(), e.kind().to_string())
    }

    #[test]
    fn an_intact_output_passes_and_every_byte_is_compared() {
        let (p, out) = converted();
        let full = against(&out, "", &p.plan, &p.inputs).unwrap();
        assert_eq!(full.tensors, 27);
        assert_eq!(full.files, out.files.len() - 1);
        assert_eq!(full.bytes, p.plan.total_bytes());
        assert_eq!(full.compared, full.bytes);
        assert_eq!(structural(&out, "").unwrap(), VerifyReport { compared: 0, ..full });
    }

    #[test]
    fn one_flipped_bit_is_found_at_its_element() {
        let (p, mut out) = converted();
        let name = "model.layers.0.mlp.down_proj.weight";
        let file = index(&out)["weight_map"][name].as_str().unwrap().to_string();
        let input = out.open(&file).unwrap();
        let header = safetensors_header::read_file(&input).unwrap();
        let [a, _] = header.tensors[name].offsets;
        let byte = (header.data_start + a + 41 * 4 + 2) as usize; // f32 element 41
        out.files.get_mut(&file).unwrap()[byte] ^= 0x10;
        // The structure is intact; only the comparison with the input sees it.
        structural(&out, "").unwrap();
        let (label, f, msg) = refused(&p, &out);
        assert_eq!((label.as_str(), f.as_str()), ("verify", format!("out/{file}").as_str()));
        assert!(
            msg.contains(&format!("'{name}' differs from the input at element 41 (byte {byte} of {file})")),
            "{msg}"
        );
    }

    #[test]
    fn the_index_must_agree_with_the_shards() {
        let (p, out) = converted();
        let good = index(&out);
        let names: Vec<String> = good["weight_map"].as_object().unwrap().keys().cloned().collect();
        let (first, last) = (&names[0], &names[names.len() - 1]);
        let other_file = good["weight_map"][last].clone();
        type Edit<'a> = Box<dyn Fn(&mut serde_json::Value) + 'a>;
        let cases: Vec<(Edit, String)> = vec![
            (Box::new(|v| v["metadata"]["total_size"] = 7.into()), "total_size is 7 but the tensors hold".into()),
            (Box::new(|v| v["metadata"] = serde_json::json!({})), "no metadata.total_size".into()),
            (
                Box::new(|v| v["weight_map"][first] = other_file.clone()),
                format!("weight_map puts '{first}' in {}", other_file.as_str().unwrap()),
            ),
            (
                Box::new(|v| v["weight_map"]["extra.weight"] = other_file.clone()),
                "weight_map lists 'extra.weight'".into(),
            ),
            (
                Box::new(|v| {
                    v["weight_map"].as_object_mut().unwrap().remove(last);
                }),
                format!("weight_map leaves out 1 tensor(s) of the shards: {last}"),
            ),
        ];
        for (edit, want) in cases {
            let mut bad = MemoryFolder { name: "out".into(), files: out.files.clone() };
            let mut v = good.clone();
            edit(&mut v);
            set_index(&mut bad, &v);
            for e in [structural(&bad, "").unwrap_err(), against(&bad, "", &p.plan, &p.inputs).unwrap_err()] {
                assert_eq!((e.label(), e.file()), ("verify", Some(format!("out/{INDEX_NAME}").as_str())), "{e}");
                assert!(e.to_string().contains(&want), "{e} lacks {want:?}");
            }
        }
        let mut no_index = MemoryFolder { name: "out".into(), files: out.files.clone() };
        no_index.files.remove(INDEX_NAME);
        let e = structural(&no_index, "").unwrap_err();
        assert_eq!((e.label(), e.file()), ("verify", Some("out")), "{e}");
        assert!(e.to_string().contains("shards but no model.safetensors.index.json"), "{e}");
    }

    #[test]
    fn a_damaged_shard_is_a_failed_verification_naming_it() {
        let (p, out) = converted();
        let file = out.files.keys().find(|f| f.ends_with(".safetensors")).unwrap().clone();
        let mut longer = MemoryFolder { name: "out".into(), files: out.files.clone() };
        longer.files.get_mut(&file).unwrap().push(0);
        let mut cut = MemoryFolder { name: "out".into(), files: out.files.clone() };
        cut.files.get_mut(&file).unwrap().truncate(4);
        for (bad, want) in [(longer, "but the file has"), (cut, "truncated")] {
            let (label, f, msg) = refused(&p, &bad);
            assert_eq!((label.as_str(), f.as_str()), ("verify", format!("out/{file}").as_str()), "{msg}");
            assert!(msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn a_different_plan_is_refused_by_name_or_dtype() {
        let (_, out) = converted();
        // Converting with --dtype bf16 would have written BF16: the f32 output does not match that plan.
        let bf16 = planned(Some(DType::BF16));
        let (label, f, msg) = refused(&bf16, &out);
        assert_eq!(label, "verify");
        assert!(f.starts_with("out/model-"), "{f}");
        assert!(msg.contains("is F32 [") && msg.contains("here but BF16 ["), "{msg}");
        // A plan with one tensor fewer and one renamed: both are named.
        let mut p = planned(None);
        p.plan.tensors.pop();
        p.plan.tensors[0].name = "renamed.weight".into();
        let (label, f, msg) = refused(&p, &out);
        assert_eq!((label.as_str(), f.as_str()), ("verify", "out"));
        assert!(msg.contains("the output holds 27 tensors, the input gives 26"), "{msg}");
        assert!(msg.contains("missing from the output: renamed.weight"), "{msg}");
        assert!(msg.contains("not from the input: "), "{msg}");
    }

    /// Every verification error names a file: an empty folder names it, a tensor in two shards the second.
    #[test]
    fn no_shards_or_a_tensor_in_two_shards_names_the_file() {
        let empty = MemoryFolder { name: "out".into(), files: Default::default() };
        let e = structural(&empty, "").unwrap_err();
        assert_eq!((e.label(), e.file()), ("verify", Some("out")), "{e}");
        let (_, out) = converted();
        let mut twice = MemoryFolder { name: "out".into(), files: out.files.clone() };
        let file = out.files.keys().find(|f| f.ends_with(".safetensors")).unwrap().clone();
        twice.files.insert("zz.safetensors".into(), out.files[&file].clone());
        let e = structural(&twice, "").unwrap_err();
        assert_eq!((e.label(), e.file()), ("verify", Some("out/zz.safetensors")), "{e}");
        assert!(e.to_string().contains("is in both"), "{e}");
    }
}
