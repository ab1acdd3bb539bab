//! What every format planner returns and the helpers they share: options, the [`Planned`] result, group
//! counts for reports, selection notes and the expansion limit. Formats and the dispatcher both sit above this
//! module; it imports neither.

use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::io::{AllowedGlobals, Input};
use crate::lora::LoraOptions;
use crate::plan::Plan;
use crate::select::{Prefix, Selection, TensorPath};
use std::collections::HashMap;

/// A note for globals off the allowlist that a pickle names without calling them (a config naming a function,
/// say): nothing was called, but the user should know the file names them.
pub fn named_globals_note(named: &[crate::error::GlobalUse]) -> Option<String> {
    if named.is_empty() {
        return None;
    }
    let mut listed: Vec<String> =
        named.iter().take(8).map(|u| format!("{} (pickle byte {})", u.global, u.offset)).collect();
    if named.len() > 8 {
        listed.push(format!("and {} more", named.len() - 8));
    }
    Some(format!(
        "the pickle names {} off ckptconv's allowlist without calling {}: {}; nothing was called",
        if named.len() == 1 { "a global" } else { "globals" },
        if named.len() == 1 { "it" } else { "them" },
        listed.join(", ")
    ))
}

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
    /// Globals beyond the allowlist that the checkpoint's pickles may call (`--allow-global`).
    pub allow_globals: AllowedGlobals,
    /// Convert one shard of a sharded Hugging Face set alone (`--allow-partial`).
    pub allow_partial: bool,
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

/// Which kind of checkpoint a plan reads. Front ends and the pipeline decide on this, never on the format text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// One torch.save file.
    TorchFile,
    /// A torch.distributed.checkpoint folder.
    Dcp,
    /// verl's per-rank DTensor files.
    Verl,
    /// A Megatron checkpoint (rank files or torch_dist).
    Megatron,
    /// Hugging Face weights: safetensors or `.bin` files, one or a sharded set.
    HfWeights,
    /// A DeepSpeed ZeRO checkpoint (its fp32 master weights).
    DeepSpeed,
}

/// A plan plus what was detected, for reports.
pub struct Planned {
    /// What kind of checkpoint the plan reads.
    pub kind: InputKind,
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

/// The group a tensor path belongs to, for reports.
pub fn group_of(p: &TensorPath) -> String {
    match p.depth() {
        0 | 1 => "(top level)".into(),
        d => p.head((d - 1).min(2)).to_string(),
    }
}

/// Counts entries into their groups in first-seen order; a hash index keeps each count O(1), so a checkpoint with
/// a hundred thousand groups costs no more than one with three.
#[derive(Default)]
pub struct GroupCounter {
    groups: Vec<Group>,
    index: HashMap<String, usize>,
}

impl GroupCounter {
    /// Counts one entry (`Some(bytes)` for a tensor) into group `name`.
    pub fn add(&mut self, name: String, bytes: Option<u64>) {
        let i = match self.index.get(&name) {
            Some(&i) => i,
            None => {
                self.index.insert(name.clone(), self.groups.len());
                self.groups.push(Group { name, tensors: 0, bytes: 0, others: 0 });
                self.groups.len() - 1
            }
        };
        let g = &mut self.groups[i];
        match bytes {
            Some(b) => {
                g.tensors += 1;
                g.bytes = g.bytes.saturating_add(b);
            }
            None => g.others += 1,
        }
    }

    /// The groups, in the order first seen.
    pub fn into_groups(self) -> Vec<Group> {
        self.groups
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlannedTensor, Source, StridedView};

    /// One tensor of `numel` bytes that reads a single stored byte over and over (stride 0), from an input of
    /// `input_len` bytes.
    fn repeating(numel: u64, input_len: usize) -> Planned {
        let view = StridedView::new("w", 0, 0, 1, DType::U8, 0, vec![numel], vec![0], 8).unwrap();
        let t = PlannedTensor::from_source("w".into(), vec![numel], Source::View(view), None);
        Planned {
            kind: InputKind::TorchFile,
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
