//! `verify`: re-reads a written output folder and checks it, structurally or against its input.
//!
//! The structural check reads every safetensors header (dtypes known, offsets contiguous, data ending
//! exactly at the end of the file) and the index (every entry names an existing file that holds the
//! tensor, `total_size` equals the tensor bytes). The full check also re-derives every tensor from the
//! input's plan and compares the bytes band by band, in bounded memory, so a single flipped bit is found.

use crate::error::{Error, ErrorKind, Result};
use crate::io::{Folder, Input};
use crate::plan::{BandBuffers, Plan};
use crate::write::safetensors::{INDEX_NAME, read_header};
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
        return Err(bad(format!("no .safetensors files in {}/{sub}", folder.name())));
    }
    let mut found = BTreeMap::new();
    let mut report = VerifyReport::default();
    for f in &shards {
        let input = folder.open(f)?;
        let (header, data_start) = read_header(&input)?;
        report.files += 1;
        for (name, (dtype, shape, [a, b])) in header {
            report.tensors += 1;
            report.bytes += b - a;
            let file = f.clone();
            if let Some(prev) =
                found.insert(name.clone(), Located { file: file.clone(), dtype, shape, start: data_start + a })
            {
                return Err(bad(format!("tensor '{name}' is in both {} and {file}", prev.file)));
            }
        }
    }
    if files.contains(&index_name) {
        let input = folder.open(&index_name)?;
        let bytes = input.read_vec(0, input.len().min(256 << 20))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("{index_name}: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad(format!("{index_name} has no weight_map")))?;
        for (name, file) in map {
            let file = file.as_str().unwrap_or("");
            match found.get(name) {
                Some(l) if l.file == format!("{prefix}{file}") => {}
                Some(l) => return Err(bad(format!("the index puts '{name}' in {file} but it is in {}", l.file))),
                None => return Err(bad(format!("the index lists '{name}' in {file}, which does not hold it"))),
            }
        }
        if map.len() != found.len() {
            return Err(bad(format!("the index lists {} tensors but the shards hold {}", map.len(), found.len())));
        }
        let total = v.get("metadata").and_then(|m| m.get("total_size")).and_then(|t| t.as_u64());
        if total != Some(report.bytes) {
            return Err(bad(format!(
                "the index says total_size {total:?} but the tensors hold {} bytes",
                report.bytes
            )));
        }
    } else if shards.len() > 1 {
        return Err(bad(format!("{} shards but no {INDEX_NAME}", shards.len())));
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
    if found.len() != plan.tensors.len() {
        let extra: Vec<&String> =
            found.keys().filter(|k| !plan.tensors.iter().any(|t| &t.name == *k)).take(5).collect();
        return Err(bad(format!(
            "the output holds {} tensors but the input gives {} (e.g. unexpected {extra:?})",
            found.len(),
            plan.tensors.len()
        )));
    }
    let mut bufs = BandBuffers::default();
    let (mut want, mut got) = (Vec::new(), Vec::new());
    let mut open: Option<(String, Input)> = None;
    for t in &plan.tensors {
        let l = found.get(&t.name).ok_or_else(|| bad(format!("tensor '{}' is missing from the output", t.name)))?;
        if l.dtype != t.dtype || l.shape != t.shape {
            return Err(bad(format!(
                "tensor '{}' is {} {:?} in the output but {} {:?} from the input",
                t.name,
                l.dtype.safetensors_name(),
                l.shape,
                t.dtype.safetensors_name(),
                t.shape
            )));
        }
        if open.as_ref().is_none_or(|(f, _)| *f != l.file) {
            open = Some((l.file.clone(), folder.open(&l.file)?));
        }
        let Some((_, out)) = &open else { continue };
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
