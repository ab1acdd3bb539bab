//! The dispatcher: finds the checkpoint inside what the user gave, detects its format (magic bytes for a single
//! file, then names in a folder) and calls that format's planner. Format modules never import this one.

use crate::error::{Error, ErrorKind, Result};
use crate::hf::BaseModel;
use crate::io::{Folder, Input};
use crate::planned::{PlanOptions, Planned};

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
    /// Hugging Face weights: an index, one weights file or a shard of a set, at this relative path.
    HfWeights(String),
    /// A DeepSpeed ZeRO tag folder (holding `*_optim_states.pt`) at this relative path.
    DeepSpeed(String),
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
    if let Some(dir) = crate::deepspeed::find(folder, &files)? {
        return Ok(Found::DeepSpeed(dir));
    }
    if let Some(dir) = crate::megatron::find_iter_dir(folder, &files)? {
        return Ok(Found::Megatron(dir));
    }
    if let Some(entry) = crate::hfset::find(&files) {
        return Ok(Found::HfWeights(entry));
    }
    Err(Error::new(ErrorKind::NotCheckpoint(
        "no checkpoint found: expected a DCP folder (.metadata), dcp_checkpoint/, model_state_dict/full_weights.pt, verl's model_world_size_W_rank_R.pt files (also under actor/), DeepSpeed ZeRO folders (latest + global_stepN/), Megatron iter_*/mp_rank_* folders or Hugging Face weights (model.safetensors, pytorch_model.bin, a sharded set and its index)"
            .into(),
    ))
    .in_file(folder.name()))
}

/// Plans whatever `folder` holds, reporting what was picked in the plan's notes. `base` is the HF model
/// the checkpoint was trained from (required for Megatron, whose names and vocabulary it decides).
pub fn plan_folder(folder: &dyn Folder, base: Option<&BaseModel>, opts: &PlanOptions) -> Result<Planned> {
    let found = locate(folder)?;
    let mut planned = match &found {
        Found::TorchFile(rel) => crate::torch::plan(folder.open(rel)?, opts)?,
        Found::HfWeights(entry) => crate::hfset::plan(folder, entry, opts)?,
        Found::DeepSpeed(dir) => crate::deepspeed::plan(folder, dir, opts)?,
        Found::Dcp(dir) => crate::dcp::plan(folder, dir, opts)?,
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
        Found::TorchFile(rel) | Found::HfWeights(rel) => Some(rel.clone()),
        Found::Dcp(dir) if !dir.is_empty() => Some(format!("{dir}/")),
        Found::Dcp(_) => None,
        Found::Verl(dir, _) | Found::Megatron(dir) | Found::DeepSpeed(dir) if !dir.is_empty() => {
            Some(format!("{dir}/"))
        }
        Found::Verl(..) | Found::Megatron(_) | Found::DeepSpeed(_) => None,
    };
    if let Some(p) = picked {
        planned.plan.notes.insert(0, format!("using {}/{p}", folder.name()));
    }
    Ok(planned)
}

/// Plans a single file: a safetensors file or a torch.save file (zip or legacy), told apart by their first bytes.
/// One shard of a sharded set is refused (its siblings are not reachable from a lone file) unless the user allows it.
pub fn plan_file(input: Input, opts: &PlanOptions) -> Result<Planned> {
    let mut head = [0u8; 9];
    let n = input.len().min(9) as usize;
    input.read_exact_at(0, &mut head[..n])?;
    if crate::hfset::sniff(&head[..n], input.len()) {
        return crate::hfset::plan_file(input, opts);
    }
    crate::hfset::check_lone_file(&input.name, opts)?;
    crate::torch::plan(input, opts)
}

/// Plans file `rel` of `folder` with its siblings: an index or one shard of a Hugging Face set reads the whole set
/// (the shard's missing siblings are an error), and anything else is planned as the file alone.
pub fn plan_member(folder: &dyn Folder, rel: &str, opts: &PlanOptions) -> Result<Planned> {
    let base = rel.rsplit('/').next().unwrap_or(rel);
    if crate::hfset::stands_for_set(base) {
        return crate::hfset::plan(folder, rel, opts);
    }
    let input = folder.open(rel)?;
    plan_file(input, opts)
}
