//! verl's FSDP checkpoints: one torch.save file per rank, `model_world_size_W_rank_R.pt`, whose values
//! are DTensor shards (local tensor + placements + mesh coordinate), next to `fsdp_config.json`.
//!
//! Each rank's local shard is placed in the global tensor by its placements, exactly as DTensor splits
//! (torch.chunk sizes, mesh dimensions applied in order); replicated copies are taken from coordinate 0.
//! The shards must tile every tensor, and every rank must hold the same names.

use crate::error::{Error, ErrorKind, Result, tensor_err};
use crate::io::join;
use crate::io::{Folder, Input};
use crate::plan::{Chunk, ChunkedTensor, Plan, PlannedTensor, Source, check_tiling};
use crate::planned::{GroupCounter, InputKind, PlanOptions, Planned, group_of, selection_notes};
use crate::select::{self, TensorPath};
use crate::torch::{DTensorMeta, FoundTensor, Placement, TorchFile};

/// The rank-file name for rank `r` of `world`.
pub fn rank_file(world: u64, r: u64) -> String {
    format!("model_world_size_{world}_rank_{r}.pt")
}

/// The world size of verl rank files directly inside `dir`, if there are any.
pub fn find_world(files: &[String], dir: &str) -> Option<u64> {
    let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    files.iter().find_map(|f| {
        let rest = f.strip_prefix(&prefix)?.strip_prefix("model_world_size_")?.strip_suffix("_rank_0.pt")?;
        rest.parse().ok()
    })
}

/// Where a rank's local shard sits: `(offsets, sizes)`, or `None` for a replicated copy off coordinate 0.
fn local_box(name: &str, m: &DTensorMeta, mesh: &[u64]) -> Result<Option<(Vec<u64>, Vec<u64>)>> {
    let mut off = vec![0u64; m.global_shape.len()];
    let mut size = m.global_shape.clone();
    for (i, p) in m.placements.iter().enumerate() {
        let (Some(&c), Some(&n)) = (m.coords.get(i), mesh.get(i)) else {
            return Err(tensor_err(name, "placements and mesh coordinates disagree in length"));
        };
        match p {
            Placement::Replicate if c != 0 => return Ok(None),
            Placement::Replicate => {}
            Placement::Shard(d) => {
                let d = *d as usize;
                let len =
                    *size.get(d).ok_or_else(|| tensor_err(name, format!("Shard({d}) of a {}-d tensor", off.len())))?;
                let chunk = len.div_ceil(n.max(1));
                // Coordinates come from the files: a hostile one must not wrap the products around.
                let start = c.checked_mul(chunk).map_or(len, |s| s.min(len));
                let end = start.saturating_add(chunk).min(len);
                off[d] = off[d].saturating_add(start);
                size[d] = end - start;
            }
            Placement::Other(class) => {
                return Err(Error::new(ErrorKind::Unsupported(format!("tensor '{name}' has placement {class}"))));
            }
        }
    }
    Ok(Some((off, size)))
}

/// Plans the verl checkpoint of `world` ranks in `dir` inside `folder`.
pub fn plan_verl(folder: &dyn Folder, dir: &str, world: u64, opts: &PlanOptions) -> Result<Planned> {
    let (inputs, ranks) = read_ranks(folder, dir, world)?;
    let mut groups = GroupCounter::default();
    let mut items: Vec<(TensorPath, (Vec<u64>, Source))> = Vec::new();
    for (k, t0) in ranks[0].iter().enumerate() {
        let (shape, source) = match &t0.dtensor {
            None => (t0.view.shape.clone(), Source::View(t0.view.clone())),
            Some(m0) => (m0.global_shape.clone(), gather(folder, &inputs, &ranks, k, t0, m0)?),
        };
        groups.add(group_of(&t0.path), Some(source.numel() * source.dtype().size() as u64));
        items.push((t0.path.clone(), (shape, source)));
    }
    let (kept, sel) = select::select(items, &opts.prefix).map_err(|e| e.in_file(folder.name()))?;
    let tensors = kept
        .into_iter()
        .map(|(name, (shape, source))| PlannedTensor::from_source(name, shape, source, opts.dtype))
        .collect();
    Planned {
        kind: InputKind::Verl,
        plan: Plan { tensors, notes: selection_notes(&sel) },
        format: format!("verl FSDP checkpoint ({world} rank files of DTensor shards)"),
        inputs,
        groups: groups.into_groups(),
    }
    .checked(folder.name())
}

/// Opens every rank's file and finds its tensors; every rank must be there and hold as many tensors as rank 0.
fn read_ranks(folder: &dyn Folder, dir: &str, world: u64) -> Result<(Vec<Input>, Vec<Vec<FoundTensor>>)> {
    if world == 0 || world > 65536 {
        return Err(Error::new(ErrorKind::NotCheckpoint(format!("world size {world} in the rank file names"))));
    }
    let mut inputs = Vec::new();
    let mut ranks: Vec<Vec<FoundTensor>> = Vec::new();
    let present: std::collections::HashSet<String> = folder.files().into_iter().collect();
    for r in 0..world {
        let rel = join(dir, &rank_file(world, r));
        if !present.contains(&rel) {
            return Err(Error::new(ErrorKind::NotCheckpoint(format!("rank {r} of {world} is missing ({rel})")))
                .in_file(folder.name()));
        }
        let mut input: Input = folder.open(&rel)?;
        let file = TorchFile::open(&mut input)?;
        ranks.push(file.tensors(&input, r as usize)?);
        inputs.push(input);
    }
    let first = ranks.first().map(Vec::len).unwrap_or(0);
    for (r, found) in ranks.iter().enumerate() {
        if found.len() != first {
            return Err(Error::new(ErrorKind::NotCheckpoint(format!(
                "rank {r} holds {} tensors but rank 0 holds {first}",
                found.len()
            )))
            .in_file(&inputs[r].name));
        }
    }
    Ok((inputs, ranks))
}

/// Tensor `k` of every rank, a DTensor shard as `t0` / `m0` on rank 0 says, placed into its global tensor.
fn gather(
    folder: &dyn Folder,
    inputs: &[Input],
    ranks: &[Vec<FoundTensor>],
    k: usize,
    t0: &FoundTensor,
    m0: &DTensorMeta,
) -> Result<Source> {
    let name = &t0.path.name;
    // Every rank's file is present, so the largest coordinate seen is the mesh's extent.
    // Tensors may live on different meshes, so this is per tensor.
    let mut mesh = vec![1u64; m0.coords.len()];
    for m in ranks.iter().filter_map(|f| f.get(k).and_then(|t| t.dtensor.as_ref())) {
        for (i, &c) in m.coords.iter().enumerate().take(mesh.len()) {
            mesh[i] = mesh[i].max(c.saturating_add(1));
        }
    }
    let mut chunks = Vec::new();
    for (r, found) in ranks.iter().enumerate() {
        let t = &found[k];
        let wrong = || {
            Error::new(ErrorKind::NotCheckpoint(format!("tensor '{name}' differs from rank 0's")))
                .in_file(&inputs[r].name)
        };
        let Some(m) = t.dtensor.as_ref().filter(|m| t.path == t0.path && m.global_shape == m0.global_shape) else {
            return Err(wrong());
        };
        if m.placements != m0.placements || t.view.dtype != t0.view.dtype {
            return Err(wrong());
        }
        let Some((offsets, sizes)) = local_box(name, m, &mesh).map_err(|e| e.in_file(&inputs[r].name))? else {
            continue;
        };
        if t.view.shape != sizes {
            return Err(tensor_err(
                name,
                format!("local shard is {:?} but its placement gives {sizes:?}", t.view.shape),
            )
            .in_file(&inputs[r].name));
        }
        chunks.push(Chunk { offsets, sizes, view: t.view.clone() });
    }
    let boxes: Vec<(&[u64], &[u64])> = chunks.iter().map(|c| (c.offsets.as_slice(), c.sizes.as_slice())).collect();
    check_tiling(name, &m0.global_shape, &boxes).map_err(|e| e.in_file(folder.name()))?;
    chunks.retain(|c| !c.sizes.contains(&0));
    Ok(Source::Chunked(ChunkedTensor::new(name, m0.global_shape.clone(), t0.view.dtype, chunks)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_like_torch_chunk() {
        let m = |c| DTensorMeta { global_shape: vec![7, 3], placements: vec![Placement::Shard(0)], coords: vec![c] };
        let boxes: Vec<_> = (0..4).map(|c| local_box("w", &m(c), &[4]).unwrap().unwrap()).collect();
        assert_eq!(boxes[0], (vec![0, 0], vec![2, 3]));
        assert_eq!(boxes[3], (vec![6, 0], vec![1, 3]));
        let m5 = DTensorMeta { global_shape: vec![5], placements: vec![Placement::Shard(0)], coords: vec![3] };
        // torch.chunk(5 rows, 4) gives 2, 2, 1 and an empty fourth chunk.
        assert_eq!(local_box("w", &m5, &[4]).unwrap().unwrap(), (vec![5], vec![0]));
        let r = DTensorMeta { global_shape: vec![5], placements: vec![Placement::Replicate], coords: vec![1] };
        assert_eq!(local_box("w", &r, &[2]).unwrap(), None);
        // A coordinate near u64::MAX (a hostile file) gives an empty box at the end, not a wrapped one.
        let far = DTensorMeta { global_shape: vec![5], placements: vec![Placement::Shard(0)], coords: vec![u64::MAX] };
        assert_eq!(local_box("w", &far, &[u64::MAX]).unwrap().unwrap(), (vec![5], vec![0]));
    }
}
