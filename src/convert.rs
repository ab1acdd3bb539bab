//! From inputs to a plan: finds the checkpoint inside what the user gave, detects its format and applies
//! the user's options.

use crate::dcp::{self, ChunkResolver};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::hf::BaseModel;
use crate::io::{Folder, Input};
use crate::lora::{self, LoraMode, LoraOptions};
use crate::plan::{Plan, PlannedTensor, Source};
use crate::select::{self, Prefix, Selection, TensorPath};
use crate::torch::TorchFile;

/// Options that shape the plan.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Cast float tensors to this dtype (`None`: keep).
    pub dtype: Option<DType>,
    /// Which tensors are the model.
    pub prefix: Prefix,
    /// Refuse checkpoints that need a base model when none is given (conversions; `inspect` can do without).
    pub require_base: bool,
    /// What to do with PEFT LoRA tensors.
    pub lora: LoraOptions,
    /// Write even when the output's names or shapes differ from the base model's weights.
    pub allow_mismatch: bool,
}

/// Applies what comes after planning: merges or exports LoRA, then, against the base model, drops a tied
/// `lm_head.weight` and checks names and shapes. Returns the `adapter_config.json` bytes in adapter mode.
pub fn finish(planned: &mut Planned, base: Option<&BaseModel>, opts: &PlanOptions) -> Result<Option<Vec<u8>>> {
    let mut adapter = None;
    if lora::has_lora(&planned.plan) {
        let plan = std::mem::take(&mut planned.plan);
        match opts.lora.mode {
            LoraMode::Merge => planned.plan = lora::merge(plan, &opts.lora)?,
            LoraMode::Adapter => {
                let base_name = base.map(|b| b.folder.name().to_string()).unwrap_or_default();
                let (p, cfg) = lora::adapter(plan, &opts.lora, &base_name)?;
                planned.plan = p;
                adapter = Some(cfg);
            }
        }
    } else if opts.lora.explicit {
        return Err(Error::new(ErrorKind::NoTensors(
            "--lora was given but the checkpoint holds no LoRA tensors".into(),
        )));
    }
    if let Some(b) = base
        && adapter.is_none()
    {
        if let Some(n) = crate::hf::drop_tied_lm_head(&mut planned.plan, b, &planned.inputs)? {
            planned.plan.notes.push(n);
        }
        if let Some(n) = crate::hf::check_against_base(&planned.plan, b, opts.allow_mismatch)? {
            planned.plan.notes.push(n);
        }
    }
    Ok(adapter)
}

/// A group of entries in the checkpoint (e.g. `fsdp_checkpoint.optimizers`), for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Dotted key path of the group.
    pub name: String,
    /// Tensors in it.
    pub tensors: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Non-tensor entries in it (DCP bytes items).
    pub others: usize,
}

/// A plan plus what was detected, for reports.
pub struct Planned {
    /// The output tensors.
    pub plan: Plan,
    /// A one-line description of the detected input format.
    pub format: String,
    /// The inputs the plan reads, by the indices its sources use.
    pub inputs: Vec<Input>,
    /// Every group of the checkpoint, selected or not.
    pub groups: Vec<Group>,
}

impl Planned {
    /// The plan as JSON fields, as `inspect --json` and the browser engine report it: `format`, `notes`, `groups`
    /// (name, tensors, bytes, others) and `tensors` (name, dtype, shape, bytes, source_dtype).
    pub fn json_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let tensors: Vec<_> = self
            .plan
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "dtype": t.dtype.safetensors_name(), "shape": t.shape, "bytes": t.nbytes(),
                    "source_dtype": t.source.dtype().safetensors_name(),
                })
            })
            .collect();
        let groups: Vec<_> = self
            .groups
            .iter()
            .map(|g| serde_json::json!({"name": g.name, "tensors": g.tensors, "bytes": g.bytes, "others": g.others}))
            .collect();
        let mut m = serde_json::Map::new();
        m.insert("format".into(), self.format.clone().into());
        m.insert("notes".into(), self.plan.notes.clone().into());
        m.insert("groups".into(), groups.into());
        m.insert("tensors".into(), tensors.into());
        m
    }
}

/// What was found inside a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A torch.save file at this relative path.
    TorchFile(String),
    /// A DCP folder at this relative path ("" for the folder itself).
    Dcp(String),
    /// verl rank files in this folder, with the world size.
    Verl(String, u64),
    /// A Megatron iteration folder (holding `mp_rank_*`).
    Megatron(String),
}

/// Finds the checkpoint inside `folder`: the folder itself when it is a DCP folder; otherwise, in a
/// `global_step_N` or `actor` folder, RLinf's `model_state_dict/full_weights.pt` (also the misspelled
/// `full_weigths.pt` of its docs), which is already whole, then `dcp_checkpoint/`.
pub fn locate(folder: &dyn Folder) -> Result<Found> {
    let files = folder.files();
    let has = |p: &str| files.iter().any(|f| f == p);
    if has(".metadata") {
        if crate::megatron::is_dist(&files, "") {
            return Ok(Found::Megatron(String::new()));
        }
        return Ok(Found::Dcp(String::new()));
    }
    for base in ["", "actor/"] {
        for name in ["full_weights.pt", "full_weigths.pt"] {
            let p = format!("{base}model_state_dict/{name}");
            if has(&p) {
                return Ok(Found::TorchFile(p));
            }
        }
        let d = format!("{base}dcp_checkpoint");
        if has(&format!("{d}/.metadata")) {
            return Ok(Found::Dcp(d));
        }
        let dir = base.trim_end_matches('/');
        if let Some(world) = crate::verl::find_world(&files, dir) {
            return Ok(Found::Verl(dir.to_string(), world));
        }
    }
    if let Some(dir) = crate::megatron::find_iter_dir(folder, &files)? {
        return Ok(Found::Megatron(dir));
    }
    Err(Error::new(ErrorKind::NotCheckpoint(
        "no checkpoint found: expected a DCP folder (.metadata), dcp_checkpoint/, model_state_dict/full_weights.pt, verl's model_world_size_W_rank_R.pt files (also under actor/) or Megatron iter_*/mp_rank_* folders"
            .into(),
    ))
    .in_file(folder.name()))
}

/// The group a tensor path belongs to, for reports.
pub fn group_of(p: &TensorPath) -> String {
    match p.depth() {
        0 | 1 => "(top level)".into(),
        d => p.head((d - 1).min(2)).to_string(),
    }
}

/// Counts one entry (`Some(bytes)` for a tensor) into its group.
pub fn add_group(groups: &mut Vec<Group>, name: String, bytes: Option<u64>) {
    let i = match groups.iter().position(|g| g.name == name) {
        Some(i) => i,
        None => {
            groups.push(Group { name, tensors: 0, bytes: 0, others: 0 });
            groups.len() - 1
        }
    };
    let g = &mut groups[i];
    match bytes {
        Some(b) => {
            g.tensors += 1;
            g.bytes += b;
        }
        None => g.others += 1,
    }
}

/// Notes that say which prefix was stripped and what was skipped.
pub fn selection_notes(sel: &Selection) -> Vec<String> {
    let mut notes = Vec::new();
    if !sel.prefix.is_empty() {
        notes.push(format!("model weights taken from '{}' (prefix stripped)", sel.prefix));
    }
    for (group, n) in &sel.skipped {
        notes.push(format!("skipped '{group}': {n} tensor(s), not model weights"));
    }
    notes
}

/// Most tensor bytes a plan may hold per byte of its input files, on top of [`EXPANSION_ALLOWANCE`]. Real
/// checkpoints stay near 1 (tied weights make 2, a zstd-compressed DCP folder a little more); views that repeat
/// the same stored bytes (stride 0, or one storage under thousands of names) can make a file of a few kilobytes
/// plan terabytes, and a converter that writes them fills the disk of whoever runs it.
pub const MAX_EXPANSION: u64 = 64;
/// Tensor bytes any plan may hold regardless of its inputs' size (small expanded buffers, tiny test files).
pub const EXPANSION_ALLOWANCE: u64 = 1 << 30;

/// The most bytes that `stored` bytes on disk may become: [`MAX_EXPANSION`] times as many plus `allowance`
/// ([`EXPANSION_ALLOWANCE`] everywhere but tests), saturating. Plans and zstd decoding both obey it.
pub(crate) fn expansion_limit(stored: u64, allowance: u64) -> u64 {
    stored.saturating_mul(MAX_EXPANSION).saturating_add(allowance)
}

impl Planned {
    /// The plan, unless its tensors hold more than [`MAX_EXPANSION`] times its inputs' bytes plus
    /// [`EXPANSION_ALLOWANCE`] (in the tensors' stored dtypes, before any cast); `file` is what the error names.
    /// Every planner ends with it.
    pub(crate) fn checked(self, file: &str) -> Result<Planned> {
        let tensors = self
            .plan
            .tensors
            .iter()
            .fold(0u64, |n, t| n.saturating_add(t.source.numel().saturating_mul(t.source.dtype().size() as u64)));
        let inputs = self.inputs.iter().fold(0u64, |n, i| n.saturating_add(i.data.stored_len()));
        let limit = expansion_limit(inputs, EXPANSION_ALLOWANCE);
        if tensors > limit {
            return Err(Error::new(ErrorKind::Limit(format!(
                "the tensors to write hold {} but the input files only {}: views that repeat the same stored bytes, \
                 or compressed items that inflate (a self-multiplying checkpoint); at most {MAX_EXPANSION} times \
                 the input plus {} GiB are written",
                bytes_text(tensors),
                bytes_text(inputs),
                EXPANSION_ALLOWANCE >> 30
            )))
            .in_file(file));
        }
        Ok(self)
    }
}

/// `n` bytes, with a readable size beside large counts ("68719478784 bytes (68.7 GB)").
fn bytes_text(n: u64) -> String {
    match n {
        0..1_000_000 => format!("{n} bytes"),
        _ if n < 1_000_000_000 => format!("{n} bytes ({:.1} MB)", n as f64 / 1e6),
        _ => format!("{n} bytes ({:.1} GB)", n as f64 / 1e9),
    }
}

/// Plans the conversion of a torch.save file.
pub fn plan_torch_file(input: Input, opts: &PlanOptions) -> Result<Planned> {
    let file = TorchFile::open(&input)?;
    let found = file.tensors(&input, 0)?;
    if found.is_empty() {
        return Err(Error::new(ErrorKind::NoTensors(format!(
            "the pickled object ({}) holds no tensors",
            file.heap.describe(file.root)
        )))
        .in_file(&input.name));
    }
    if let Some(t) = found.iter().find(|t| t.dtensor.is_some()) {
        return Err(Error::new(ErrorKind::Unsupported(format!(
            "'{}' is a DTensor shard of a sharded checkpoint (verl's model_world_size_W_rank_R.pt); convert the folder that holds every rank's file",
            t.path.name
        )))
        .in_file(&input.name));
    }
    let mut groups = Vec::new();
    for t in &found {
        add_group(&mut groups, group_of(&t.path), Some(t.view.numel() * t.view.dtype.size() as u64));
    }
    let items = found.into_iter().map(|t| (t.path, t.view)).collect();
    let (kept, sel) = select::select(items, &opts.prefix).map_err(|e| e.in_file(&input.name))?;
    let tensors = kept
        .into_iter()
        .map(|(name, view)| PlannedTensor::from_source(name, view.shape.clone(), Source::View(view), opts.dtype))
        .collect();
    let name = input.name.clone();
    Planned {
        plan: Plan { tensors, notes: selection_notes(&sel) },
        format: file.format.to_string(),
        inputs: vec![input],
        groups,
    }
    .checked(&name)
}

/// Plans the conversion of a DCP folder at `dir` inside `folder`.
pub fn plan_dcp(folder: &dyn Folder, dir: &str, opts: &PlanOptions) -> Result<Planned> {
    let meta = dcp::read_metadata(folder, dir)?;
    let meta_name = format!("{}/{}", folder.name(), dcp::join(dir, ".metadata"));
    let mut groups = Vec::new();
    for t in &meta.tensors {
        add_group(&mut groups, group_of(&t.path), Some(t.nbytes()));
    }
    for b in &meta.bytes_items {
        add_group(&mut groups, group_of(&TensorPath::from_parts(&b.split('.').collect::<Vec<_>>())), None);
    }
    if meta.tensors.is_empty() {
        return Err(Error::new(ErrorKind::NoTensors("the DCP metadata lists no tensors".into())).in_file(&meta_name));
    }
    let items = meta.tensors.iter().map(|t| (t.path.clone(), t)).collect();
    let (kept, sel) = select::select(items, &opts.prefix).map_err(|e| e.in_file(&meta_name))?;
    let mut resolver = ChunkResolver::new(folder, dir);
    let mut tensors = Vec::with_capacity(kept.len());
    for (name, t) in kept {
        let chunked = resolver.resolve(t).map_err(|e| e.in_file(&meta_name))?;
        tensors.push(PlannedTensor::from_source(name, t.shape.clone(), Source::Chunked(chunked), opts.dtype));
    }
    let files = resolver.files_used();
    Planned {
        plan: Plan { tensors, notes: selection_notes(&sel) },
        format: format!("torch.distributed.checkpoint folder ({files} .distcp file(s) used)"),
        inputs: resolver.inputs,
        groups,
    }
    .checked(&meta_name)
}

/// Plans whatever `folder` holds, reporting what was picked in the plan's notes. `base` is the HF model
/// the checkpoint was trained from (required for Megatron, whose names and vocabulary it decides).
pub fn plan_folder(folder: &dyn Folder, base: Option<&BaseModel>, opts: &PlanOptions) -> Result<Planned> {
    let found = locate(folder)?;
    let mut planned = match &found {
        Found::TorchFile(rel) => plan_torch_file(folder.open(rel)?, opts)?,
        Found::Dcp(dir) => plan_dcp(folder, dir, opts)?,
        Found::Verl(dir, world) => crate::verl::plan_verl(folder, dir, *world, opts)?,
        Found::Megatron(dir) => {
            if base.is_none() && opts.require_base {
                return Err(Error::new(ErrorKind::NotCheckpoint(
                    "a Megatron checkpoint needs the base Hugging Face model it was trained from (its config.json and tokenizer): give it as the base model (--base HF_DIR, mg2hf's third argument, or the page's base-model folder)".into(),
                ))
                .in_file(folder.name()));
            }
            let (mut p, args) = crate::megatron::plan_megatron(folder, dir, base, opts)?;
            if base.is_none() {
                p.plan.notes.push("no base model: the family is guessed and the padded vocabulary is kept".into());
            }
            p.plan.notes.push(args);
            p
        }
    };
    let picked = match &found {
        Found::TorchFile(rel) => Some(rel.clone()),
        Found::Dcp(dir) if !dir.is_empty() => Some(format!("{dir}/")),
        Found::Dcp(_) => None,
        Found::Verl(dir, _) | Found::Megatron(dir) if !dir.is_empty() => Some(format!("{dir}/")),
        Found::Verl(..) | Found::Megatron(_) => None,
    };
    if let Some(p) = picked {
        planned.plan.notes.insert(0, format!("using {}/{p}", folder.name()));
    }
    Ok(planned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::StridedView;

    /// One tensor of `numel` bytes that reads a single stored byte over and over (stride 0), from an input of
    /// `input_len` bytes.
    fn repeating(numel: u64, input_len: usize) -> Planned {
        let view = StridedView::new("w", 0, 0, 1, DType::U8, 0, vec![numel], vec![0], 8).unwrap();
        let t = PlannedTensor::from_source("w".into(), vec![numel], Source::View(view), None);
        Planned {
            plan: Plan { tensors: vec![t], notes: Vec::new() },
            format: "test".into(),
            inputs: vec![Input::new("in.pt", Box::new(vec![0u8; input_len]))],
            groups: Vec::new(),
        }
    }

    #[test]
    fn a_plan_may_hold_64_times_its_inputs_plus_1_gib_and_no_more() {
        let limit = 1000 * MAX_EXPANSION + EXPANSION_ALLOWANCE;
        assert!(repeating(limit, 1000).checked("in.pt").is_ok());
        let Err(e) = repeating(limit + 1, 1000).checked("in.pt") else {
            panic!("one byte over the limit was accepted")
        };
        assert_eq!((e.label(), e.file()), ("limit", Some("in.pt")));
        assert!(e.to_string().contains("self-multiplying"), "{e}");
        // Totals past u64 saturate instead of wrapping around to something small.
        let mut huge = repeating(u64::MAX / 2 + 1, 1000);
        huge.plan.tensors.push(huge.plan.tensors[0].clone());
        assert!(huge.checked("in.pt").is_err());
    }
}
