//! DeepSpeed ZeRO checkpoints (stages 1, 2 and 3): the fp32 master weights, gathered from the flat optimizer
//! partitions of every data-parallel rank as DeepSpeed's own `zero_to_fp32.py` gathers them, but as views: each
//! parameter is the pieces of the ranks' flat tensors that hold it, read band by band, never the model in memory.
//!
//! A checkpoint folder holds `latest` (the tag, e.g. `global_step10`) and the tag's folder, which holds
//! - `mp_rank_00_model_states.pt` (stages 1 and 2) or `zero_pp_rank_R_mp_rank_00_model_states.pt` (one per rank,
//!   stage 3): `param_shapes` (one ordered name -> shape map per parameter group), `buffer_names` and the
//!   buffers in `module`, `shared_params` (tied name -> name it is tied to), `frozen_param_shapes` and
//!   `frozen_param_fragments` (whole tensors at stages 1 and 2; each rank's padded slice at stage 3);
//! - `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`, one per rank: `optimizer_state_dict` with `zero_stage`,
//!   `partition_count` (the world size) and the fp32 partitions: `single_partition_of_fp32_groups` (stages 1
//!   and 2: group g is the concatenation of every rank's partition g, parameters back to back, with
//!   `param_alignment_paddings` between them when present) or `fp32_flat_groups` (stage 3: each parameter is split
//!   over the ranks in `ceil(numel / world)` pieces, each rank's piece at the same offset of its flat groups).

use crate::error::{Error, ErrorKind, Result, some_names, tensor_err};
use crate::io::{Folder, Input};
use crate::pickle::{Heap, Id, Node};
use crate::plan::{Chunk, ChunkedTensor, Plan, PlannedTensor, Source, StridedView};
use crate::planned::{GroupCounter, InputKind, PlanOptions, Planned};
use crate::torch::TorchFile;
use std::collections::{BTreeMap, HashMap};

/// Most ranks read (the largest ZeRO runs have a few thousand).
const MAX_RANKS: u64 = 65_536;
/// Most parameters one checkpoint may name.
const MAX_PARAMS: usize = 400_000;

/// Whether a file name is a ZeRO optimizer partition, and of which rank.
fn optim_rank(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("bf16_").unwrap_or(name).strip_prefix("zero_pp_rank_")?;
    let (rank, tail) = rest.split_once('_')?;
    (tail == "mp_rank_00_optim_states.pt").then_some(())?;
    rank.parse().ok()
}

/// The folder (relative, "" for the root) whose files are a ZeRO checkpoint's tag folder: the root, the tag that
/// `latest` names, or the only `global_step*` folder. `None` when the folder holds no ZeRO checkpoint.
pub fn find(folder: &dyn Folder, files: &[String]) -> Result<Option<String>> {
    let holds = |dir: &str| {
        files.iter().any(|f| {
            let (d, n) = f.rsplit_once('/').unwrap_or(("", f));
            d == dir && optim_rank(n).is_some()
        })
    };
    if holds("") {
        return Ok(Some(String::new()));
    }
    if files.iter().any(|f| f == "latest") {
        let input = folder.open("latest")?;
        let bytes = input.read_vec(0, input.len().min(4096))?;
        let tag = String::from_utf8_lossy(&bytes).trim().to_string();
        if tag.is_empty() || tag.contains(['/', '\\']) || tag == ".." {
            return Err(Error::new(ErrorKind::NotCheckpoint(format!("'latest' names no checkpoint tag ({tag:?})")))
                .in_file(&input.name));
        }
        if !holds(&tag) {
            return Err(Error::new(ErrorKind::Inconsistent(format!(
                "'latest' names {tag}, but {tag}/ holds no ZeRO optimizer partitions (*_optim_states.pt)"
            )))
            .in_file(&input.name));
        }
        return Ok(Some(tag));
    }
    let mut tags: Vec<&str> = files
        .iter()
        .filter_map(|f| f.split_once('/').map(|(d, _)| d))
        .filter(|d| d.starts_with("global_step") && holds(d))
        .collect();
    tags.dedup();
    match tags[..] {
        [] => Ok(None),
        [one] => Ok(Some(one.to_string())),
        _ => Err(Error::new(ErrorKind::NotCheckpoint(format!(
            "several ZeRO checkpoints and no 'latest' file to pick one: {}; give one of them",
            some_names(&tags, 8)
        )))
        .in_file(folder.name())),
    }
}

/// An int, or an `IntEnum` member (DeepSpeed pickles `zero_stage` as its `ZeroStageEnum`, called with the value).
fn int_like(h: &Heap, id: Id) -> Option<i64> {
    match h.get(id) {
        Node::Object { args, .. } => h.as_int(*h.as_seq(*args)?.first()?),
        _ => h.as_int(id),
    }
}

/// An ordered dict's items: a dict, or an `OrderedDict` object filled by SETITEMS.
fn pairs(h: &Heap, id: Id) -> Option<&[(Id, Id)]> {
    match h.get(id) {
        Node::Dict(items) => Some(items),
        Node::Object { items, .. } => Some(items),
        _ => None,
    }
}

/// A `torch.Size` (an object whose argument is a tuple of ints) or a plain tuple/list of ints.
fn shape_of(h: &Heap, id: Id) -> Option<Vec<u64>> {
    let seq = match h.get(id) {
        Node::Object { args, .. } => h.as_seq(*h.as_seq(*args)?.first()?)?,
        _ => h.as_seq(id)?,
    };
    seq.iter().map(|&d| u64::try_from(h.as_int(d)?).ok()).collect()
}

/// `(name, shape)` of an ordered name -> shape map.
fn shapes(h: &Heap, id: Id, what: &str) -> Result<Vec<(String, Vec<u64>)>> {
    let bad = || Error::new(ErrorKind::NotCheckpoint(format!("{what} is not a map of names to shapes")));
    let items = pairs(h, id).ok_or_else(bad)?;
    let one = |k: Id, v: Id| Some((h.as_str(k)?.to_string(), shape_of(h, v)?));
    items.iter().map(|&(k, v)| one(k, v).ok_or_else(bad)).collect()
}

/// One opened torch.save file of the checkpoint.
struct Opened {
    file: TorchFile,
    idx: usize,
}

/// The tensors under `path` (dotted keys from the root), by their index in that list.
fn tensor_list(o: &Opened, input: &Input, path: &[&str]) -> Result<Option<Vec<StridedView>>> {
    let h = &o.file.heap;
    let mut at = o.file.root;
    for k in path {
        let Some(next) = h.dict_get(at, k) else { return Ok(None) };
        at = next;
    }
    let Some(items) = h.as_seq(at) else { return Ok(None) };
    let n = items.len();
    let found = o.file.tensors_at(input, o.idx, at, Vec::new())?;
    let mut out: Vec<Option<StridedView>> = vec![None; n];
    for t in found {
        if let Some(slot) = t.path.name.parse::<usize>().ok().and_then(|i| out.get_mut(i)) {
            *slot = Some(t.view);
        }
    }
    let views: Option<Vec<StridedView>> = out.into_iter().collect();
    views.map(Some).ok_or_else(|| {
        Error::new(ErrorKind::NotCheckpoint(format!("{} holds something other than tensors", path.join("."))))
            .in_file(&input.name)
    })
}

/// A parameter's flat elements `[0, numel)` as pieces `(global start, view of 1-D elements)`, assembled into a
/// tensor of `shape`.
fn assemble(
    name: &str,
    shape: Vec<u64>,
    pieces: Vec<(u64, StridedView)>,
    cast: Option<crate::dtype::DType>,
) -> Result<PlannedTensor> {
    let numel: u64 = shape.iter().product();
    let dtype = pieces.first().map(|(_, v)| v.dtype).unwrap_or(crate::dtype::DType::F32);
    let source = match &pieces[..] {
        [(0, v)] if v.is_contiguous() && v.numel() == numel => {
            let strides = crate::plan::view::contiguous_strides(&shape);
            Source::View(StridedView::new(
                name,
                v.input,
                v.data_start,
                v.storage_bytes,
                v.dtype,
                v.offset,
                shape.clone(),
                strides,
                64,
            )?)
        }
        _ => {
            let chunks: Vec<Chunk> = pieces
                .into_iter()
                .filter(|(_, v)| v.numel() > 0)
                .map(|(at, view)| Chunk { offsets: vec![at], sizes: vec![view.numel()], view })
                .collect();
            let boxes: Vec<(&[u64], &[u64])> = chunks.iter().map(|c| (&c.offsets[..], &c.sizes[..])).collect();
            crate::plan::check_tiling(name, &[numel], &boxes)?;
            Source::Chunked(ChunkedTensor::new(name, vec![numel], dtype, chunks)?)
        }
    };
    Ok(PlannedTensor::from_source(name.to_string(), shape, source, cast))
}

/// A vector made of 1-D parts laid back to back (a parameter group over the ranks, or one rank's flat groups).
struct Flat<'a> {
    parts: &'a [StridedView],
    /// Where each part starts, and the total at the end.
    starts: Vec<u64>,
}

impl<'a> Flat<'a> {
    fn new(parts: &'a [StridedView]) -> Self {
        let mut starts = Vec::with_capacity(parts.len() + 1);
        let mut at = 0u64;
        for p in parts {
            starts.push(at);
            at = at.saturating_add(p.numel());
        }
        starts.push(at);
        Flat { parts, starts }
    }

    fn len(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// The pieces of `[start, start + len)`, placed from `at` on in the parameter (found by binary search, so a
    /// parameter costs its pieces, not the number of parts).
    fn pieces(&self, name: &str, start: u64, len: u64, at: u64, out: &mut Vec<(u64, StridedView)>) -> Result<()> {
        let end = start.checked_add(len).filter(|&e| e <= self.len()).ok_or_else(|| {
            tensor_err(name, format!("elements {start}..{} lie past the partition's {}", start + len, self.len()))
        })?;
        let mut i = self.starts.partition_point(|&s| s <= start).saturating_sub(1);
        while i < self.parts.len() && self.starts[i] < end {
            let (a, b) = (self.starts[i], self.starts[i + 1]);
            let (lo, hi) = (start.max(a), end.min(b));
            if lo < hi {
                out.push((at + (lo - start), self.parts[i].rows(name, lo - a, hi - a)?));
            }
            i += 1;
        }
        Ok(())
    }
}

/// Most pieces all parameters may be cut into (ZeRO-3 cuts each in one per rank).
const MAX_PIECES: u64 = 16 << 20;

/// Plans the ZeRO checkpoint in folder `dir` of `folder`.
pub fn plan(folder: &dyn Folder, dir: &str, opts: &PlanOptions) -> Result<Planned> {
    let files = folder.files();
    let in_dir = |f: &String| -> Option<String> {
        let (d, n) = f.rsplit_once('/').unwrap_or(("", f));
        (d == dir).then(|| n.to_string())
    };
    let names: Vec<String> = files.iter().filter_map(in_dir).collect();
    let shown_dir = if dir.is_empty() { folder.name().to_string() } else { crate::io::join(folder.name(), dir) };
    let mut optim: BTreeMap<u64, String> = BTreeMap::new();
    for n in &names {
        if let Some(r) = optim_rank(n)
            && optim.insert(r, n.clone()).is_some()
        {
            return Err(Error::new(ErrorKind::Inconsistent(format!("two optimizer partitions of rank {r}")))
                .in_file(&shown_dir));
        }
    }
    let mut inputs: Vec<Input> = Vec::new();
    let open = |rel: &str, inputs: &mut Vec<Input>| -> Result<Opened> {
        let mut input = folder.open(&crate::io::join(dir, rel))?;
        let file = TorchFile::open(&mut input)?;
        inputs.push(input);
        Ok(Opened { file, idx: inputs.len() - 1 })
    };
    // Rank 0's partition says the stage and the world size.
    let Some(first) = optim.values().next().cloned() else {
        return Err(Error::new(ErrorKind::NotCheckpoint("no ZeRO optimizer partitions (*_optim_states.pt)".into()))
            .in_file(&shown_dir));
    };
    let o0 = open(&first, &mut inputs)?;
    let (stage, world) = {
        let h = &o0.file.heap;
        let osd = h.dict_get(o0.file.root, "optimizer_state_dict");
        let int = |k: &str| osd.and_then(|o| h.dict_get(o, k)).and_then(|v| int_like(h, v));
        let has = |k: &str| osd.and_then(|o| h.dict_get(o, k)).is_some();
        let stage = int("zero_stage").ok_or_else(|| {
            let kind = if has("single_partition_of_fp32_groups") && has("group_paddings") {
                // BF16_Optimizer (bf16 with grad_accum_dtype fp32 at stage 1) saves no stage; zero_to_fp32 refuses it too.
                ErrorKind::Unsupported(
                    "DeepSpeed's BF16_Optimizer partitions (bf16 at ZeRO-1 with grad_accum_dtype fp32): no zero_stage, \
                     and zero_to_fp32.py does not read them either"
                        .into(),
                )
            } else {
                ErrorKind::NotCheckpoint("optimizer_state_dict has no zero_stage: not a ZeRO partition".into())
            };
            Error::new(kind).in_file(&inputs[o0.idx].name)
        })?;
        let world = match osd.and_then(|o| h.dict_get(o, "partition_count")) {
            Some(v) => match h.get(v) {
                Node::List(l) | Node::Tuple(l) => l.iter().filter_map(|&x| h.as_int(x)).max(),
                _ => h.as_int(v),
            },
            None => None,
        };
        let world =
            world.and_then(|w| u64::try_from(w).ok()).filter(|w| (1..=MAX_RANKS).contains(w)).ok_or_else(|| {
                Error::new(ErrorKind::NotCheckpoint("optimizer_state_dict has no usable partition_count".into()))
                    .in_file(&inputs[o0.idx].name)
            })?;
        (stage, world)
    };
    if !(1..=3).contains(&stage) {
        return Err(Error::new(ErrorKind::Unsupported(format!("ZeRO stage {stage}"))).in_file(&inputs[o0.idx].name));
    }
    // Name what is missing as DeepSpeed names rank 0's file (with or without the bf16_ prefix).
    let prefix = if first.starts_with("bf16_") { "bf16_" } else { "" };
    let missing: Vec<String> = (0..world)
        .filter(|r| !optim.contains_key(r))
        .map(|r| format!("rank {r} ({prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt)"))
        .collect();
    if !missing.is_empty() || optim.len() as u64 != world {
        let extra: Vec<String> = optim.keys().filter(|&&r| r >= world).map(|r| format!("rank {r}")).collect();
        return Err(Error::new(ErrorKind::Inconsistent(format!(
            "partition_count says {world} ranks; optimizer partitions missing for {}{}",
            if missing.is_empty() { "none".into() } else { some_names(&missing, 8) },
            if extra.is_empty() {
                String::new()
            } else {
                format!(", and present for ranks past it: {}", some_names(&extra, 8))
            }
        )))
        .in_file(&shown_dir));
    }
    if names.iter().any(|n| n.contains("mp_rank_") && !n.contains("mp_rank_00")) {
        return Err(Error::new(ErrorKind::Unsupported(
            "model-parallel ranks besides mp_rank_00 (Megatron-DeepSpeed tensor parallelism)".into(),
        ))
        .in_file(&shown_dir));
    }
    let groups_key = if stage <= 2 { "single_partition_of_fp32_groups" } else { "fp32_flat_groups" };
    let mut parts: Vec<Vec<StridedView>> = Vec::with_capacity(world as usize);
    let mut opened = vec![o0];
    for r in 1..world {
        let name = optim.get(&r).cloned().unwrap_or_default();
        opened.push(open(&name, &mut inputs)?);
    }
    let mut paddings: Option<Vec<Vec<u64>>> = None;
    for (r, o) in opened.iter().enumerate() {
        let input = &inputs[o.idx];
        let list = tensor_list(o, input, &["optimizer_state_dict", groups_key])?.ok_or_else(|| {
            Error::new(ErrorKind::NotCheckpoint(format!("optimizer_state_dict has no {groups_key}")))
                .in_file(&input.name)
        })?;
        if list.iter().any(|v| v.shape.len() != 1) {
            return Err(Error::new(ErrorKind::NotCheckpoint(format!("{groups_key} holds tensors that are not flat")))
                .in_file(&input.name));
        }
        if r == 0 {
            let h = &o.file.heap;
            let pads = h
                .dict_get(o.file.root, "optimizer_state_dict")
                .and_then(|x| h.dict_get(x, "param_alignment_paddings"))
                .and_then(|x| h.as_seq(x));
            paddings = pads.map(|g| {
                g.iter()
                    .map(|&l| {
                        h.as_seq(l).unwrap_or(&[]).iter().map(|&p| h.as_int(p).unwrap_or(0).max(0) as u64).collect()
                    })
                    .collect()
            });
        }
        if let Some(p0) = parts.first()
            && (p0.len() != list.len() || (stage == 3 && p0.iter().zip(&list).any(|(a, b)| a.numel() != b.numel())))
        {
            return Err(Error::new(ErrorKind::Inconsistent(format!(
                "{groups_key} differs from rank 0's in number or size of groups"
            )))
            .in_file(&input.name));
        }
        parts.push(list);
    }
    // The model states: rank 0's for names and shapes; every rank's at stage 3 for frozen fragments.
    let model_name = |r: u64| {
        if stage <= 2 {
            "mp_rank_00_model_states.pt".to_string()
        } else {
            format!("zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        }
    };
    if !names.iter().any(|n| *n == model_name(0)) {
        return Err(Error::new(ErrorKind::Inconsistent(format!("{} is missing", model_name(0)))).in_file(&shown_dir));
    }
    let m0 = open(&model_name(0), &mut inputs)?;
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let cast = opts.dtype.or(Some(crate::dtype::DType::F32));
    let h = &m0.file.heap;
    let root = m0.file.root;
    let m0_name = inputs[m0.idx].name.clone();
    let bad = |m: String| Error::new(ErrorKind::NotCheckpoint(m)).in_file(&m0_name);
    let shapes_id =
        h.dict_get(root, "param_shapes").ok_or_else(|| bad("no param_shapes: not ZeRO model states".into()))?;
    let groups: Vec<Vec<(String, Vec<u64>)>> = h
        .as_seq(shapes_id)
        .ok_or_else(|| bad("param_shapes is not a list".into()))?
        .iter()
        .enumerate()
        .map(|(g, &id)| shapes(h, id, &format!("param_shapes[{g}]")).map_err(|e| e.in_file(&m0_name)))
        .collect::<Result<_>>()?;
    if groups.iter().map(Vec::len).sum::<usize>() > MAX_PARAMS {
        return Err(Error::new(ErrorKind::Limit(format!("more than {MAX_PARAMS} parameters"))).in_file(&m0_name));
    }
    // Buffers, as zero_to_fp32 keeps them (floats in fp32).
    let buffer_names: Vec<String> = h
        .dict_get(root, "buffer_names")
        .and_then(|b| h.as_seq(b))
        .map(|s| s.iter().filter_map(|&x| h.as_str(x).map(str::to_string)).collect())
        .unwrap_or_default();
    if !buffer_names.is_empty() {
        let module = h.dict_get(root, "module").ok_or_else(|| bad("no module to take buffers from".into()))?;
        let found = m0.file.tensors_at(&inputs[m0.idx], m0.idx, module, Vec::new())?;
        let by_name: HashMap<String, StridedView> = found.into_iter().map(|t| (t.path.name, t.view)).collect();
        for b in &buffer_names {
            let v = by_name.get(b).ok_or_else(|| bad(format!("buffer '{b}' is not in module")))?;
            let to = if v.dtype.is_castable_float() { cast } else { None };
            out.push(PlannedTensor::from_source(b.clone(), v.shape.clone(), Source::View(v.clone()), to));
        }
    }
    // Frozen parameters.
    let frozen = match h.dict_get(root, "frozen_param_shapes").filter(|&f| !matches!(h.get(f), Node::None)) {
        Some(f) => shapes(h, f, "frozen_param_shapes").map_err(|e| e.in_file(&m0_name))?,
        None => Vec::new(),
    };
    if (frozen.len() as u64).saturating_mul(world) > MAX_PIECES {
        return Err(Error::new(ErrorKind::Limit(format!("{} frozen parameters over {world} ranks", frozen.len())))
            .in_file(&m0_name));
    }
    if !frozen.is_empty() {
        let mut fragments: Vec<HashMap<String, StridedView>> = Vec::new();
        let ranks = if stage <= 2 { 1 } else { world };
        for r in 0..ranks {
            let m = if r == 0 {
                None
            } else if !names.contains(&model_name(r)) {
                return Err(Error::new(ErrorKind::Inconsistent(format!(
                    "rank {r}'s model states ({}) are missing: they hold its part of the frozen parameters",
                    model_name(r)
                )))
                .in_file(&shown_dir));
            } else {
                Some(open(&model_name(r), &mut inputs)?)
            };
            let o = m.as_ref().unwrap_or(&m0);
            let h = &o.file.heap;
            let f = h.dict_get(o.file.root, "frozen_param_fragments").ok_or_else(|| {
                Error::new(ErrorKind::NotCheckpoint("frozen_param_shapes without frozen_param_fragments".into()))
                    .in_file(&inputs[o.idx].name)
            })?;
            let found = o.file.tensors_at(&inputs[o.idx], o.idx, f, Vec::new())?;
            fragments.push(found.into_iter().map(|t| (t.path.name, t.view)).collect());
        }
        for (name, shape) in &frozen {
            let numel: u64 = shape.iter().product();
            let mut pieces = Vec::new();
            let mut at = 0u64;
            for (r, frags) in fragments.iter().enumerate() {
                let v = frags.get(name).ok_or_else(|| {
                    tensor_err(name, format!("frozen, but rank {r}'s model states hold no fragment of it"))
                        .in_file(&shown_dir)
                })?;
                let flat = StridedView::new(
                    name,
                    v.input,
                    v.data_start,
                    v.storage_bytes,
                    v.dtype,
                    v.offset,
                    vec![v.numel()],
                    vec![1],
                    1,
                )
                .ok()
                .filter(|_| v.is_contiguous())
                .ok_or_else(|| tensor_err(name, "a frozen fragment that is not contiguous").in_file(&shown_dir))?;
                let take = flat.numel().min(numel.saturating_sub(at));
                if take > 0 {
                    pieces.push((at, flat.rows(name, 0, take)?));
                }
                at += take;
            }
            if at < numel {
                return Err(
                    tensor_err(name, format!("its fragments hold {at} of its {numel} elements")).in_file(&shown_dir)
                );
            }
            // zero_to_fp32 keeps frozen parameters in the dtype they were trained in.
            out.push(assemble(name, shape.clone(), pieces, opts.dtype).map_err(|e| e.in_file(&shown_dir))?);
        }
    }
    // Trainable parameters, from the partitions.
    let n_groups = parts[0].len();
    if stage <= 2 && groups.len() != n_groups {
        return Err(bad(format!("param_shapes has {} groups, the partitions {n_groups}", groups.len())));
    }
    let n_params = groups.iter().map(Vec::len).sum::<usize>() as u64;
    if stage == 3 && n_params.saturating_mul(world) > MAX_PIECES {
        return Err(Error::new(ErrorKind::Limit(format!(
            "{n_params} parameters over {world} ranks: more than {MAX_PIECES} pieces to gather"
        )))
        .in_file(&shown_dir));
    }
    if stage <= 2 {
        for (g, shapes) in groups.iter().enumerate() {
            let ranks: Vec<StridedView> = parts.iter().map(|p| p[g].clone()).collect();
            let flat = Flat::new(&ranks);
            let avail = flat.len();
            let pads = paddings.as_ref().and_then(|p| p.get(g));
            let mut offset = 0u64;
            for (i, (name, shape)) in shapes.iter().enumerate() {
                let numel: u64 = shape.iter().product();
                let mut pieces = Vec::new();
                flat.pieces(name, offset, numel, 0, &mut pieces).map_err(|e| e.in_file(&shown_dir))?;
                out.push(assemble(name, shape.clone(), pieces, cast).map_err(|e| e.in_file(&shown_dir))?);
                offset += numel + pads.and_then(|p| p.get(i)).copied().unwrap_or(0);
            }
            let align = |x: u64| x.div_ceil(2 * world) * (2 * world);
            if align(offset) != align(avail) {
                return Err(Error::new(ErrorKind::Inconsistent(format!(
                    "parameter group {g}: the parameters take {offset} elements, the partitions hold {avail}"
                )))
                .in_file(&shown_dir));
            }
        }
    } else {
        let flats: Vec<Flat> = parts.iter().map(|p| Flat::new(p)).collect();
        let avail = flats[0].len();
        let mut offset = 0u64;
        for (name, shape) in groups.iter().flatten() {
            let numel: u64 = shape.iter().product();
            let part = numel.div_ceil(world);
            let mut pieces = Vec::new();
            for (r, flat) in flats.iter().enumerate() {
                let at = r as u64 * part;
                let take = part.min(numel.saturating_sub(at));
                if take > 0 {
                    flat.pieces(name, offset, take, at, &mut pieces).map_err(|e| e.in_file(&shown_dir))?;
                }
            }
            out.push(assemble(name, shape.clone(), pieces, cast).map_err(|e| e.in_file(&shown_dir))?);
            offset += part;
        }
        if offset != avail {
            return Err(Error::new(ErrorKind::Inconsistent(format!(
                "the parameters take {offset} elements of each rank's partition, which holds {avail}"
            )))
            .in_file(&shown_dir));
        }
    }
    // ZeRO-1 records no frozen parameters (DeepSpeed saves them from stage 2 on), so zero_to_fp32 leaves them out
    // and its model is incomplete; the model states' `module` still holds them, in the dtype they were trained in.
    let shared: Vec<(String, String)> = h
        .dict_get(root, "shared_params")
        .and_then(|s| pairs(h, s))
        .map(|sp| sp.iter().filter_map(|&(k, v)| Some((h.as_str(k)?.to_string(), h.as_str(v)?.to_string()))).collect())
        .unwrap_or_default();
    if stage <= 2
        && let Some(module) = h.dict_get(root, "module")
    {
        let have: std::collections::HashSet<String> =
            out.iter().map(|t| t.name.clone()).chain(shared.iter().map(|(k, _)| k.clone())).collect();
        let mut only = 0usize;
        for t in m0.file.tensors_at(&inputs[m0.idx], m0.idx, module, Vec::new())? {
            if !have.contains(&t.path.name) {
                out.push(PlannedTensor::from_source(
                    t.path.name,
                    t.view.shape.clone(),
                    Source::View(t.view),
                    opts.dtype,
                ));
                only += 1;
            }
        }
        if only > 0 {
            notes.push(format!(
                "{only} parameter(s) only in the model states' module (frozen at ZeRO-1, which records no frozen \
                 parameters; zero_to_fp32 leaves them out): taken from there, in their training dtype"
            ));
        }
    }
    // Shared (tied) parameters: the name they are tied to, under their own name too.
    let index: HashMap<String, usize> = out.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    for (dst, src) in &shared {
        if let Some(&i) = index.get(src) {
            let t = PlannedTensor { name: dst.clone(), ..out[i].clone() };
            out.push(t);
        }
    }
    let mut dup = std::collections::HashSet::new();
    if let Some(t) = out.iter().find(|t| !dup.insert(t.name.clone())) {
        return Err(Error::new(ErrorKind::Inconsistent(format!("'{}' is named twice", t.name))).in_file(&m0_name));
    }
    let mut counts = GroupCounter::default();
    for t in &out {
        counts.add("fp32 master weights".into(), Some(t.nbytes()));
    }
    notes.push(format!("ZeRO stage {stage}, {world} rank(s): fp32 master weights from the optimizer partitions, as zero_to_fp32.py gathers them"));
    if !frozen.is_empty() {
        notes.push(format!("{} frozen parameter(s) from the model states", frozen.len()));
    }
    Planned {
        kind: InputKind::DeepSpeed,
        plan: Plan { tensors: out, notes },
        format: format!("DeepSpeed ZeRO-{stage} checkpoint ({world} ranks)"),
        inputs,
        groups: counts.into_groups(),
    }
    .checked(&shown_dir)
}
