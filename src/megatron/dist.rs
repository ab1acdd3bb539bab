//! Megatron's `torch_dist` checkpoints (`--ckpt-format torch_dist`): an iteration folder that is a DCP folder
//! (`.metadata`, `__R_0.distcp`) plus `common.pt` (the non-tensor state, `args` included) and `metadata.json`.
//!
//! Tensors are global: the layers of the decoder are stacked on a leading dimension
//! (`decoder.layers.self_attention.linear_qkv.weight` is `[num_layers, out, in]`) and numbered across pipeline
//! stages, and each chunk is one layer of one tensor-parallel rank's shard. So every chunk is exactly what that
//! rank's file holds in the legacy format, and the checkpoint is planned as one stage of TP ranks rebuilt from
//! the chunks. SwiGLU's fc1 is the exception: stored as `[gate_all; up_all]`, its halves come apart. Experts are
//! stacked a second time on their global number (`[layers, experts, ...]`), so they become the experts of one
//! expert-parallel rank, numbered globally.

use super::{Args, FC1_GATE, FC1_UP, RankModel, bad, read_args};
use crate::dcp::{self, ChunkResolver};
use crate::error::{Error, ErrorKind, Result};
use crate::io::join;
use crate::io::{Folder, Input};
use crate::pickle::Node;
use crate::plan::StridedView;
use crate::torch::TorchFile;
use std::collections::BTreeMap;

/// How SequentialMLP (and GroupedMLP) name their experts in torch_dist, under `decoder.layers.`: one tensor per
/// weight, `[layers, experts, ...]`, the expert axis global (megatron/core/transformer/moe/experts.py).
const EXPERTS: &str = "mlp.experts.experts.";

/// The file beside the DCP files that marks a Megatron torch_dist checkpoint.
pub const COMMON: &str = "common.pt";

/// Whether `dir` (inside a folder listing `files`) is a Megatron torch_dist iteration folder.
pub fn is_dist(files: &[String], dir: &str) -> bool {
    let (meta, common) = (join(dir, ".metadata"), join(dir, COMMON));
    files.contains(&meta) && files.contains(&common)
}

/// The model tensors of a torch_dist checkpoint, as the tensor-parallel ranks of one stage.
pub struct DistRanks {
    /// `.distcp` files (and decoded items) the views read, then the `.metadata` (what messages about ranks name).
    pub inputs: Vec<Input>,
    /// One per tensor-parallel rank.
    pub ranks: Vec<RankModel>,
    /// `args` from `common.pt`.
    pub args: Option<Args>,
    /// `common.pt`'s name, for messages about `args`.
    pub args_file: String,
    /// The grid the checkpoint was saved from.
    pub tp: u64,
    /// Pipeline stages it was saved from (the tensors no longer depend on it).
    pub pp: u64,
    /// `.distcp` files read.
    pub files: usize,
}

/// Where a chunk of one (per-layer) tensor belongs.
enum Home {
    /// Every rank holds the same bytes.
    All,
    /// One rank's shard.
    Rank(usize),
    /// fc1's gate (`false`) or up (`true`) half of one rank.
    Half(bool, usize),
}

/// Reads `dir`'s `common.pt` args and `.metadata`, and assigns every model tensor's chunks to ranks.
pub fn load_dist(folder: &dyn Folder, dir: &str) -> Result<DistRanks> {
    let mut common = folder.open(&join(dir, COMMON))?;
    let file = TorchFile::open(&mut common)?;
    let h = &file.heap;
    let args = h.dict_get(file.root, "args").filter(|&a| !matches!(h.get(a), Node::None)).map(|a| read_args(h, a));
    let meta = dcp::read_metadata(folder, dir)?;
    let meta_name = format!("{}/{}", folder.name(), join(dir, ".metadata"));
    let arg = |k: &str| args.as_ref().and_then(|a| a.get(k));
    let tp = match arg("tensor_model_parallel_size") {
        Some(t) if (1..=4096).contains(&t) => t,
        Some(t) => return Err(bad(format!("args say tensor_model_parallel_size = {t}")).in_file(&common.name)),
        None => return Err(bad("no args.tensor_model_parallel_size in common.pt").in_file(&common.name)),
    };
    let pp = arg("pipeline_model_parallel_size").unwrap_or(1);
    let layers = arg("num_layers").ok_or_else(|| bad("no args.num_layers in common.pt").in_file(&common.name))?;
    let mut maps: Vec<BTreeMap<String, StridedView>> = vec![BTreeMap::new(); tp as usize];
    let gated = args.as_ref().and_then(|a| a.flag("swiglu")) != Some(false);
    let experts = arg("num_experts");
    let etp = arg("expert_tensor_parallel_size").filter(|&e| e == 1).unwrap_or(tp);
    let mut resolver = ChunkResolver::new(folder, dir);
    for t in &meta.tensors {
        // The optimizer's state and TE's _extra_state are not part of the HF model (RNG state is stored as bytes).
        // Every other tensor is, so one without an HF place (an MTP or vision tower, experts) is refused by the
        // merge rather than dropped.
        let key = t.fqn.strip_prefix("model.").unwrap_or(&t.fqn);
        if key.starts_with("optimizer.") || key.ends_with("_extra_state") {
            continue;
        }
        let chunked = resolver.resolve(t).map_err(|e| e.in_file(&meta_name))?;
        let under = key.strip_prefix("decoder.layers.");
        // Per-layer keys (`decoder.layers.L.…`: megatron-core writes them when moe_layer_freq is a list, its
        // layers then differing) carry no layer axis; stacked ones (`decoder.layers.…`) lead with it.
        let fixed = under.and_then(|r| {
            let (n, rest) = r.split_once('.')?;
            Some((n.parse::<u64>().ok()?, rest))
        });
        let stacked = if fixed.is_some() { None } else { under };
        let suffix = fixed.map(|f| f.1).or(stacked);
        if let Some((l, _)) = fixed.filter(|f| f.0 >= layers) {
            return Err(bad(format!("'{}' is layer {l}, but num_layers is {layers}", t.fqn)).in_file(&meta_name));
        }
        if stacked.is_some() && t.shape.first() != Some(&layers) {
            return Err(bad(format!(
                "'{}' has shape {:?}: a stacked layer tensor should lead with num_layers = {layers}",
                t.fqn, t.shape
            ))
            .in_file(&meta_name));
        }
        // The dense MLP's, the shared experts' and every expert's fc1.
        let fc1 = gated && suffix.is_some_and(|s| s.ends_with("linear_fc1.weight"));
        // Experts are stacked (again) on the global expert number: `[layers, experts, ...]` or `[experts, ...]`.
        let expert = suffix.and_then(|s| s.strip_prefix(EXPERTS));
        let axis = usize::from(stacked.is_some());
        if expert.is_some() && (t.shape.len() <= axis + 1 || experts.is_some_and(|e| t.shape[axis] != e)) {
            let want = experts.map_or("num_experts".into(), |e| e.to_string());
            let lead = if stacked.is_some() { format!("num_layers = {layers}, ") } else { String::new() };
            return Err(bad(format!(
                "'{}' has shape {:?}: stacked experts should be [{lead}num_experts = {want}, ...]",
                t.fqn, t.shape
            ))
            .in_file(&meta_name));
        }
        for c in chunked.chunks() {
            // (layer, view, offsets, sizes, global shape) of each layer the chunk holds.
            let mut layer_pieces = Vec::new();
            match (stacked, fixed) {
                (Some(_), _) => {
                    for i in 0..c.sizes[0] {
                        let view = c.view.layer(&t.fqn, i)?;
                        layer_pieces.push((c.offsets[0] + i, view, &c.offsets[1..], &c.sizes[1..], &t.shape[1..]));
                    }
                }
                (None, Some((l, _))) => {
                    layer_pieces.push((l, c.view.clone(), &c.offsets[..], &c.sizes[..], &t.shape[..]))
                }
                (None, None) => {}
            }
            // (name, view, offsets, sizes, global shape) of each layer (and expert) the chunk holds, or of the
            // whole chunk.
            let mut pieces = Vec::new();
            for (l, view, offsets, sizes, shape) in layer_pieces {
                match (expert, suffix) {
                    (Some(rest), _) => {
                        for x in 0..sizes[0] {
                            let e = offsets[0] + x;
                            let name = format!("decoder.layers.{l}.mlp.experts.local_experts.{e}.{rest}");
                            let v = view.layer(&name, x)?;
                            pieces.push((name, v, &offsets[1..], &sizes[1..], &shape[1..]));
                        }
                    }
                    (None, Some(suffix)) => {
                        pieces.push((format!("decoder.layers.{l}.{suffix}"), view, offsets, sizes, shape))
                    }
                    (None, None) => {}
                }
            }
            if under.is_none() {
                pieces.push((key.to_string(), c.view.clone(), &c.offsets[..], &c.sizes[..], &t.shape[..]));
            }
            for (name, view, offsets, sizes, shape) in pieces {
                // Experts are split over expert-TP ranks (TP, or 1: whole on every rank).
                let parts = if expert.is_some() { etp } else { tp };
                let home = home(&name, offsets, sizes, shape, parts, fc1).map_err(|e| e.in_file(&meta_name))?;
                let mut put = |r: usize, name: String| {
                    maps[r].insert(name, view.clone());
                };
                match home {
                    Home::All => (0..tp as usize).for_each(|r| put(r, name.clone())),
                    Home::Rank(r) => put(r, name),
                    Home::Half(up, r) => {
                        let base = name.trim_end_matches("linear_fc1.weight");
                        put(r, format!("{base}{}", if up { FC1_UP } else { FC1_GATE }));
                    }
                }
            }
        }
    }
    let files = resolver.files_used();
    let mut inputs = resolver.inputs;
    inputs.push(folder.open(&join(dir, ".metadata"))?);
    let at = inputs.len() - 1;
    let ranks = maps
        .into_iter()
        .enumerate()
        .map(|(r, m)| RankModel { tp: r as u64, pp: 0, ep: 0, input: at, chunks: vec![m], args: args.clone() })
        .collect();
    Ok(DistRanks { inputs, ranks, args, args_file: common.name.clone(), tp, pp, files })
}

/// Which rank a chunk (`offsets`/`sizes` in a tensor of `shape`, layer dimension removed) belongs to: the one
/// dimension it is cut along, in `tp` equal parts (fc1: `2 tp`, gates first), or none (replicated).
fn home(name: &str, offsets: &[u64], sizes: &[u64], shape: &[u64], tp: u64, fc1: bool) -> Result<Home> {
    let cut: Vec<usize> = (0..shape.len()).filter(|&d| sizes[d] != shape[d]).collect();
    let d = match cut.as_slice() {
        [] => return Ok(Home::All),
        [d] => *d,
        _ => {
            return Err(Error::new(ErrorKind::Unsupported(format!(
                "'{name}' is cut along several dimensions ({sizes:?} of {shape:?}): not a tensor-parallel shard"
            ))));
        }
    };
    let parts = if fc1 { 2 * tp } else { tp };
    if sizes[d] == 0 || sizes[d].checked_mul(parts) != Some(shape[d]) || !offsets[d].is_multiple_of(sizes[d]) {
        let (size, at, of) = (sizes[d], offsets[d], shape[d]);
        return Err(bad(format!(
            "'{name}' has a chunk of {size} at {at} along dimension {d} of {of}: not one of {parts} equal \
             tensor-parallel parts (the args say TP = {tp})"
        )));
    }
    let part = (offsets[d] / sizes[d]) as usize;
    let tp = tp as usize;
    Ok(match fc1 {
        false => Home::Rank(part),
        true if d == 0 => Home::Half(part >= tp, part % tp),
        true => return Err(bad(format!("'{name}': fc1 is cut along dimension {d}, expected its rows"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(offsets: &[u64], sizes: &[u64], shape: &[u64], fc1: bool) -> Result<Home> {
        home("t", offsets, sizes, shape, 2, fc1)
    }

    #[test]
    fn chunks_find_their_rank() {
        assert!(matches!(place(&[0, 0], &[8, 4], &[8, 4], false), Ok(Home::All)));
        assert!(matches!(place(&[4, 0], &[4, 4], &[8, 4], false), Ok(Home::Rank(1))));
        assert!(matches!(place(&[0, 2], &[8, 2], &[8, 4], false), Ok(Home::Rank(1))));
        // fc1 [gate_all; up_all] at TP 2: four row blocks, gates first.
        assert!(matches!(place(&[4, 0], &[4, 4], &[16, 4], true), Ok(Home::Half(false, 1))));
        assert!(matches!(place(&[8, 0], &[4, 4], &[16, 4], true), Ok(Home::Half(true, 0))));
    }

    #[test]
    fn chunks_that_are_not_tensor_parallel_shards_are_refused() {
        let msg = |r: Result<Home>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(place(&[0, 0], &[4, 2], &[8, 4], false)).contains("several dimensions"));
        assert!(msg(place(&[0, 0], &[2, 4], &[8, 4], false)).contains("not one of 2 equal"));
        assert!(msg(place(&[3, 0], &[4, 4], &[8, 4], false)).contains("not one of 2 equal"));
        assert!(msg(place(&[0, 1], &[8, 1], &[8, 4], true)).contains("expected its rows"));
    }
}
