//! Hugging Face weight files as input, as `save_pretrained` writes them: one `model.safetensors` or
//! `pytorch_model.bin`, or a sharded set (`NAME-0000k-of-0000N.EXT` plus `NAME.EXT.index.json`).
//!
//! safetensors files are read through their header alone (our reader, see [`crate::safetensors_header`]) and each
//! tensor becomes a view of the file, so casts, resharding, dequantization and `verify` work on them as on any
//! other input. `.bin` files are torch.save files read by [`crate::torch`]. A set is converted whole or not at all:
//! the index must name files that exist and tensors where they are, and a shard never stands for its set.

use crate::error::{Error, ErrorKind, Result, some_names};
use crate::io::{Folder, Input};
use crate::plan::{Plan, PlannedTensor, Source, StridedView};
use crate::planned::{GroupCounter, InputKind, PlanOptions, Planned};
use crate::torch::TorchFile;
use std::collections::{BTreeMap, HashMap};

/// Largest index file read (DeepSeek-V3's, about 92,000 tensors, is under 10 MB).
const MAX_INDEX: u64 = 32 << 20;

/// What a file name says about the set it belongs to: `pytorch_model-00002-of-00003.bin` is shard 2 of 3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardName {
    /// The name before `-0000k`, with any folder (`sub/pytorch_model`).
    pub stem: String,
    /// Which shard, from 1.
    pub k: u64,
    /// How many shards.
    pub n: u64,
    /// Digits in each number, as the name writes them.
    pub width: usize,
    /// The extension without the dot (`bin`, `safetensors`).
    pub ext: String,
}

impl ShardName {
    /// Parses `STEM-K-of-N.EXT` (both numbers the same width, 1 <= K <= N).
    pub fn parse(rel: &str) -> Option<ShardName> {
        let (stem_nums, ext) = rel.rsplit_once('.')?;
        let (rest, n) = stem_nums.rsplit_once("-of-")?;
        let (stem, k) = rest.rsplit_once('-')?;
        let digits = |s: &str| !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(k) || k.len() != n.len() || !digits(n) || stem.is_empty() || ext.contains('/') {
            return None;
        }
        let (k_num, n_num) = (k.parse().ok()?, n.parse().ok()?);
        (1..=n_num).contains(&k_num).then(|| ShardName {
            stem: stem.to_string(),
            k: k_num,
            n: n_num,
            width: k.len(),
            ext: ext.to_string(),
        })
    }

    /// The name of shard `k` of this set.
    pub fn sibling(&self, k: u64) -> String {
        format!("{}-{:0w$}-of-{:0w$}.{}", self.stem, k, self.n, self.ext, w = self.width)
    }

    /// The index file transformers writes beside the set.
    pub fn index(&self) -> String {
        format!("{}.{}.index.json", self.stem, self.ext)
    }
}

/// The files transformers names its weights, in the order a folder is searched.
const SINGLE: [&str; 4] =
    ["model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"];

/// The weight set a folder holds at its top level, if any: an index, a single weights file, or the first shard of
/// a set without its index.
pub fn find(files: &[String]) -> Option<String> {
    if let Some(f) = SINGLE.iter().find(|n| files.iter().any(|f| f == *n)) {
        return Some(f.to_string());
    }
    let mut shards: Vec<&String> = files
        .iter()
        .filter(|f| !f.contains('/') && ShardName::parse(f).is_some_and(|s| s.ext == "safetensors" || s.ext == "bin"))
        .collect();
    shards.sort();
    shards.first().map(|s| s.to_string())
}

/// Whether `head` (the first bytes of a file of `len` bytes) starts a safetensors file: a little-endian header
/// length that fits in the file, then a JSON object.
pub fn sniff(head: &[u8], len: u64) -> bool {
    let Some(n) = head.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes) else {
        return false;
    };
    head.get(8) == Some(&b'{') && n >= 2 && n <= len.saturating_sub(8)
}

/// The one error for a lone shard: which of its siblings are missing, or how to convert the set.
fn lone_shard(rel: &str, s: &ShardName, missing: &[String]) -> Error {
    let what = if missing.is_empty() {
        format!("give the folder or {} to convert the whole set", s.index())
    } else {
        format!("{} of its siblings are not beside it: {}", missing.len(), some_names(missing, 8))
    };
    Error::new(ErrorKind::Inconsistent(format!(
        "this file is shard {} of {} of a sharded set; {what} (--allow-partial converts this shard alone)",
        s.k, s.n
    )))
    .in_file(rel)
}

/// Whether a file given by name stands for a set read from its folder: an index, one shard, or one of the
/// names `save_pretrained` gives a single weights file (then its folder's config goes with it).
pub fn stands_for_set(name: &str) -> bool {
    name.ends_with(".index.json") || ShardName::parse(name).is_some() || SINGLE.contains(&name)
}

/// Refuses one shard of a set given alone (no folder to find its siblings in), unless the user allows it.
pub fn check_lone_file(name: &str, opts: &PlanOptions) -> Result<()> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    match ShardName::parse(base) {
        Some(s) if !opts.allow_partial && s.n > 1 => Err(lone_shard(name, &s, &[])),
        _ => Ok(()),
    }
}

/// What ckptconv reads of an index file: its `weight_map` (other fields are skipped unread). Parsed straight into
/// the map, not through a JSON tree, so the largest index allowed costs about its own size in memory.
#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// An index's `weight_map`: tensor name -> file (relative to the index's folder).
fn read_index(folder: &dyn Folder, rel: &str) -> Result<BTreeMap<String, String>> {
    let input = folder.open(rel)?;
    if input.len() > MAX_INDEX {
        return Err(
            Error::new(ErrorKind::Limit(format!("index larger than {} MiB", MAX_INDEX >> 20))).in_file(&input.name)
        );
    }
    let bytes = input.read_vec(0, input.len())?;
    let bad = |m: String| Error::new(ErrorKind::NotCheckpoint(m)).in_file(&input.name);
    let index: IndexFile = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("not an index (a weight_map of names to files): {e}")))?;
    for (name, file) in &index.weight_map {
        if file.is_empty() || file.starts_with('/') || file.split(['/', '\\']).any(|p| p == "..") {
            return Err(bad(format!("weight_map['{name}'] names '{file}', which is not a file beside the index")));
        }
    }
    if index.weight_map.is_empty() {
        return Err(bad("the weight_map is empty".into()));
    }
    Ok(index.weight_map)
}

/// The files a set is read from (relative to the folder) and its index, if any: from `entry`, an index, one
/// weights file or one shard (whose siblings must all be there).
type Index = Option<(String, BTreeMap<String, String>)>;

fn files_of(folder: &dyn Folder, entry: &str, opts: &PlanOptions) -> Result<(Vec<String>, Index)> {
    let all = folder.files();
    let has = |p: &str| all.iter().any(|f| f == p);
    let dir = entry.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    let join = |f: &str| crate::io::join(dir, f);
    if entry.ends_with(".index.json") {
        let map = read_index(folder, entry)?;
        let distinct: std::collections::BTreeSet<&str> = map.values().map(String::as_str).collect();
        let files: Vec<String> = distinct.into_iter().map(join).collect();
        let missing: Vec<&String> = files.iter().filter(|f| !has(f)).collect();
        if !missing.is_empty() {
            return Err(Error::new(ErrorKind::Inconsistent(format!(
                "the index names {} file(s) that are not in the folder: {}",
                missing.len(),
                some_names(&missing, 8)
            )))
            .in_file(&crate::io::join(folder.name(), entry)));
        }
        return Ok((files, Some((entry.to_string(), map))));
    }
    let base = entry.rsplit('/').next().unwrap_or(entry);
    match ShardName::parse(base) {
        Some(s) if s.n > 1 && !opts.allow_partial => {
            if has(&join(&s.index())) {
                return files_of(folder, &join(&s.index()), opts);
            }
            let missing: Vec<String> = (1..=s.n).map(|k| s.sibling(k)).filter(|f| !has(&join(f))).collect();
            if !missing.is_empty() {
                return Err(lone_shard(&crate::io::join(folder.name(), entry), &s, &missing));
            }
            Ok(((1..=s.n).map(|k| join(&s.sibling(k))).collect(), None))
        }
        _ => Ok((vec![entry.to_string()], None)),
    }
}

/// One tensor found in a file of the set.
struct Found {
    name: String,
    view: StridedView,
    file: usize,
}

/// Every tensor of one weights file, as views of input `idx`.
fn tensors_of(input: &mut Input, idx: usize, out: &mut Vec<Found>) -> Result<&'static str> {
    let mut head = [0u8; 9];
    let n = input.len().min(9) as usize;
    input.read_exact_at(0, &mut head[..n])?;
    if sniff(&head[..n], input.len()) {
        let header = crate::safetensors_header::read_file(input)?;
        for (name, e) in header.tensors {
            let [a, b] = e.offsets;
            let start = header.data_start.saturating_add(a);
            let view =
                StridedView::whole(&name, idx, start, b - a, e.dtype, e.shape).map_err(|e| e.in_file(&input.name))?;
            out.push(Found { name, view, file: idx });
        }
        return Ok("safetensors");
    }
    let file = TorchFile::open(input)?;
    for t in file.tensors(input, idx)? {
        if t.dtensor.is_some() {
            return Err(Error::new(ErrorKind::Unsupported(format!(
                "'{}' is a DTensor shard, not a Hugging Face weight",
                t.path.name
            )))
            .in_file(&input.name));
        }
        out.push(Found { name: t.path.name, view: t.view, file: idx });
    }
    Ok("torch.save")
}

/// Plans the set `entry` names in `folder` (an index, a weights file or one shard of a set).
pub fn plan(folder: &dyn Folder, entry: &str, opts: &PlanOptions) -> Result<Planned> {
    let (files, index) = files_of(folder, entry, opts)?;
    let index_name = index.as_ref().map(|(n, _)| n.clone());
    let mut inputs = Vec::with_capacity(files.len());
    let mut found = Vec::new();
    let mut kinds = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let mut input = folder.open(f)?;
        let name = input.name.clone();
        kinds.push(tensors_of(&mut input, i, &mut found).map_err(|e| e.in_file(&name))?);
        inputs.push(input);
    }
    kinds.dedup();
    let shown = crate::io::join(folder.name(), index_name.as_deref().unwrap_or(entry));
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(found.len());
    for t in &found {
        if let Some(&other) = seen.get(t.name.as_str()) {
            return Err(Error::new(ErrorKind::Inconsistent(format!(
                "'{}' is in both {} and {}",
                t.name, files[other], files[t.file]
            )))
            .in_file(&shown));
        }
        seen.insert(&t.name, t.file);
    }
    if let Some((ix, map)) = &index {
        check_index(ix, map, &files, &found, &seen)?;
    }
    if found.is_empty() {
        return Err(Error::new(ErrorKind::NoTensors("the weights hold no tensors".into())).in_file(&shown));
    }
    let mut groups = GroupCounter::default();
    let tensors = found
        .into_iter()
        .map(|t| {
            groups.add(files[t.file].clone(), Some(t.view.numel() * t.view.dtype.size() as u64));
            PlannedTensor::from_source(t.name, t.view.shape.clone(), Source::View(t.view), opts.dtype)
        })
        .collect();
    let what = match (files.len(), &index_name) {
        (1, None) => format!("Hugging Face weights ({})", kinds.join(", ")),
        (n, Some(ix)) => format!("Hugging Face sharded weights ({}, {n} file(s), index {ix})", kinds.join(", ")),
        (n, None) => format!("Hugging Face sharded weights ({}, {n} shards, no index)", kinds.join(", ")),
    };
    let mut notes = Vec::new();
    let entry_base = entry.rsplit('/').next().unwrap_or(entry);
    if let Some(s) = ShardName::parse(entry_base).filter(|s| s.n > 1) {
        notes.push(match files.len() {
            1 => format!("--allow-partial: only {entry}, shard {} of {}", s.k, s.n),
            n => format!("{entry} is shard {} of {}: converting the whole set ({n} files)", s.k, s.n),
        });
    }
    Planned {
        kind: InputKind::HfWeights,
        plan: Plan { tensors, notes },
        format: what,
        inputs,
        groups: groups.into_groups(),
    }
    .checked(&shown)
}

/// The index must say where every tensor is: each tensor in the file it names, and nothing else.
fn check_index(
    ix: &str,
    map: &BTreeMap<String, String>,
    files: &[String],
    found: &[Found],
    seen: &HashMap<&str, usize>,
) -> Result<()> {
    let dir = ix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    let bad = |m: String| Err(Error::new(ErrorKind::Inconsistent(m)).in_file(ix));
    for t in found {
        match map.get(&t.name) {
            None => return bad(format!("'{}' is in {} but the index does not list it", t.name, files[t.file])),
            Some(f) if crate::io::join(dir, f) != files[t.file] => {
                return bad(format!("the index puts '{}' in {f}, but it is in {}", t.name, files[t.file]));
            }
            Some(_) => {}
        }
    }
    if let Some((name, f)) = map.iter().find(|(n, _)| !seen.contains_key(n.as_str())) {
        return bad(format!("the index puts '{name}' in {f}, but no file of the set holds it"));
    }
    Ok(())
}

/// Plans one weights file given alone (no folder around it): a safetensors file.
pub fn plan_file(mut input: Input, opts: &PlanOptions) -> Result<Planned> {
    check_lone_file(&input.name, opts)?;
    let mut found = Vec::new();
    let kind = tensors_of(&mut input, 0, &mut found)?;
    let name = input.name.clone();
    if found.is_empty() {
        return Err(Error::new(ErrorKind::NoTensors("the file holds no tensors".into())).in_file(&name));
    }
    let mut groups = GroupCounter::default();
    let tensors = found
        .into_iter()
        .map(|t| {
            groups.add("(top level)".into(), Some(t.view.numel() * t.view.dtype.size() as u64));
            PlannedTensor::from_source(t.name, t.view.shape.clone(), Source::View(t.view), opts.dtype)
        })
        .collect();
    Planned {
        kind: InputKind::HfWeights,
        plan: Plan { tensors, notes: Vec::new() },
        format: format!("Hugging Face weights ({kind})"),
        inputs: vec![input],
        groups: groups.into_groups(),
    }
    .checked(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_parse_as_transformers_writes_them() {
        let s = ShardName::parse("pytorch_model-00002-of-00003.bin").unwrap();
        assert_eq!((s.stem.as_str(), s.k, s.n, s.ext.as_str()), ("pytorch_model", 2, 3, "bin"));
        assert_eq!(s.sibling(3), "pytorch_model-00003-of-00003.bin");
        assert_eq!(s.index(), "pytorch_model.bin.index.json");
        assert!(ShardName::parse("model-00004-of-00003.safetensors").is_none(), "k past n");
        assert!(ShardName::parse("model-0001-of-00003.safetensors").is_none(), "widths differ");
        assert!(ShardName::parse("model.safetensors").is_none());
        assert!(ShardName::parse("-00001-of-00002.bin").is_none(), "no stem");
    }

    #[test]
    fn safetensors_is_told_from_a_pickle_by_its_first_bytes() {
        let mut st = 10u64.to_le_bytes().to_vec();
        st.push(b'{');
        assert!(sniff(&st, 100));
        assert!(!sniff(&st, 12), "header longer than the file");
        assert!(!sniff(b"\x80\x02}q\x00(X\x05\x00", 100));
        assert!(!sniff(b"PK\x03\x04\x00\x00\x00\x00\x00", 100));
    }
}
