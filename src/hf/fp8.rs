//! FP8 checkpoints (DeepSeek-V3's release and others that follow it): `P.weight` in float8 beside its scales
//! `P.weight_scale_inv` (one per block of the weight; the block size is the config's
//! `quantization_config.weight_block_size`, 128x128 by default) or a single per-tensor `P.weight_scale`.
//! Asked for a float output dtype, every such weight is dequantized (see [`crate::plan::BlockDequant`]) and the
//! scales go; without a cast the checkpoint is written as it is, FP8 and scales together.

use super::BaseModel;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result, some_names, tensor_err};
use crate::io::Input;
use crate::plan::{BlockDequant, Plan, Source};
use std::collections::HashMap;

/// DeepSeek-V3's block size, which transformers' FP8 configs also default to.
const DEFAULT_BLOCK: (u64, u64) = (128, 128);

/// The file a tensor's bytes come from, for errors.
fn file_of(source: &Source, inputs: &[Input]) -> String {
    let first = match source {
        Source::View(v) => Some(v.input),
        Source::Chunked(c) => c.chunks().first().map(|c| c.view.input),
        Source::Lora(_) | Source::Dequant(_) => None,
    };
    first.and_then(|i| inputs.get(i)).map(|i| i.name.clone()).unwrap_or_default()
}

/// The block size the base config declares, else the default.
fn block_size(base: Option<&BaseModel>) -> Result<(u64, u64)> {
    let Some(q) = base.and_then(|b| b.config.get("quantization_config")) else { return Ok(DEFAULT_BLOCK) };
    let Some(v) = q.get("weight_block_size").filter(|v| !v.is_null()) else { return Ok(DEFAULT_BLOCK) };
    let dims: Option<Vec<u64>> = v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect());
    match dims.as_deref() {
        Some(&[r, c]) if (1..=1 << 20).contains(&r) && (1..=1 << 20).contains(&c) => Ok((r, c)),
        _ => Err(Error::new(ErrorKind::Config(format!(
            "quantization_config.weight_block_size is {v}, not two positive block sizes"
        )))
        .in_file(&crate::io::join(base.map(|b| b.folder.name()).unwrap_or(""), "config.json"))),
    }
}

/// With a float `cast`, dequantizes every FP8 weight with its scales and drops the scales (and activation
/// `input_scale`s, meaningless once the weights are not FP8). An FP8 tensor without a scale, or a scale that
/// does not fit its weight's block grid, is an error: casting the raw FP8 values would give a silently wrong
/// model. Returns whether anything was dequantized, and a note.
pub fn dequantize(
    plan: &mut Plan,
    base: Option<&BaseModel>,
    cast: Option<DType>,
    inputs: &[Input],
) -> Result<Option<String>> {
    let Some(out) = cast else { return Ok(None) };
    let is_fp8 = |d: DType| matches!(d, DType::F8E4M3 | DType::F8E5M2);
    if !plan.tensors.iter().any(|t| is_fp8(t.source.dtype()) && t.name.ends_with("weight")) {
        return Ok(None);
    }
    let block = block_size(base)?;
    let index: HashMap<String, usize> = plan.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let mut used = vec![false; plan.tensors.len()];
    let mut done = 0usize;
    let mut per_tensor = 0usize;
    let mut unscaled = Vec::new();
    for i in 0..plan.tensors.len() {
        // Quantized weights are `*.weight`; any other FP8 tensor keeps its type, as casts leave FP8 alone.
        if !is_fp8(plan.tensors[i].source.dtype()) || !plan.tensors[i].name.ends_with("weight") {
            continue;
        }
        let name = plan.tensors[i].name.clone();
        let scale =
            [format!("{name}_scale_inv"), format!("{name}_scale")].into_iter().find_map(|n| index.get(&n).copied());
        let Some(s) = scale else {
            unscaled.push(name);
            continue;
        };
        let (w, sc) = (&plan.tensors[i], &plan.tensors[s]);
        // A scale that does not fit is the scale's file's fault (or the config's block size, which it names).
        let d = BlockDequant::new(&name, w.source.clone(), sc.source.clone(), &w.shape, block, out).map_err(|e| {
            let fits_default = block != DEFAULT_BLOCK
                && BlockDequant::new(&name, w.source.clone(), sc.source.clone(), &w.shape, DEFAULT_BLOCK, out).is_ok();
            match (fits_default, base) {
                (true, Some(b)) => e
                    .with_more(&format!(
                        ": config.json declares {}x{} blocks, but the scales fit {}x{}",
                        block.0, block.1, DEFAULT_BLOCK.0, DEFAULT_BLOCK.1
                    ))
                    .in_file(&crate::io::join(b.folder.name(), "config.json")),
                _ => e.in_file(&file_of(&sc.source, inputs)),
            }
        })?;
        per_tensor += usize::from(sc.source.numel() == 1);
        let t = &mut plan.tensors[i];
        t.source = Source::Dequant(Box::new(d));
        t.dtype = out;
        used[s] = true;
        done += 1;
    }
    if let Some(first) = unscaled.first() {
        let file = index.get(first).map(|&i| file_of(&plan.tensors[i].source, inputs)).unwrap_or_default();
        return Err(tensor_err(
            first,
            format!(
                "{} FP8 tensor(s) have no scale beside them ({first}_scale_inv or {first}_scale), so --dtype {} cannot dequantize them: {}",
                unscaled.len(),
                out.torch_name(),
                some_names(&unscaled, 8)
            ),
        )
        .in_file(&file));
    }
    let mut activation = 0usize;
    for (t, u) in plan.tensors.iter().zip(used.iter_mut()) {
        if t.name.ends_with(".input_scale") && t.source.numel() == 1 {
            *u = true;
            activation += 1;
        }
    }
    let mut k = 0;
    plan.tensors.retain(|_| {
        k += 1;
        !used[k - 1]
    });
    let blocks = match (done - per_tensor, per_tensor) {
        (0, p) => format!("{p} per-tensor scaled"),
        (b, 0) => format!("{b} in {}x{} blocks", block.0, block.1),
        (b, p) => format!("{b} in {}x{} blocks, {p} per-tensor scaled", block.0, block.1),
    };
    let acts = if activation > 0 { format!(", {activation} activation scales dropped") } else { String::new() };
    Ok(Some(format!("dequantized {done} FP8 weights to {} ({blocks}){acts}", out.torch_name())))
}
