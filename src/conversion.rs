//! One conversion pipeline for every front end: from a checkpoint, options and an optional base model to the
//! ordered set of output files, each with its name, exact size and segments, pulled through one puller.
//!
//! The CLI, the WASI build and the page only drive a [`Conversion`]: they say where input bytes come from
//! (a [`Folder`] or one [`Input`]) and where output pieces go (a [`crate::write::Sink`], or the pieces themselves
//! through a [`crate::write::Puller`]). Planning, LoRA, the checks against the base model, the output layout,
//! save-helper files, the adapter config and the base model's files are all decided here.

use crate::detect;
use crate::error::{Error, ErrorKind, Result};
use crate::hf::{self, BaseModel};
use crate::io::{Folder, Input, Trusting};
use crate::lora::{self, LoraMode};
use crate::plan::{Plan, PlannedTensor};
use crate::planned::{InputKind, PlanOptions, Planned};
use crate::write::safetensors::{self, ADAPTER_CONFIG};
use crate::write::torch_save::TorchSaveLayout;
use crate::write::{OutputFile, OutputSet, Segment, Sink};

/// What the user gave: one file, or a folder to look inside.
pub enum Checkpoint<'a> {
    /// A single file (a torch.save file).
    File(Input),
    /// A folder: a DCP, RLinf, verl, Megatron or Hugging Face checkpoint, found inside by [`detect::locate`].
    Folder(&'a dyn Folder),
    /// One file of a folder, read with its siblings where it needs them: an index or one shard of a Hugging Face
    /// set stands for the whole set ([`detect::plan_member`]).
    Member(&'a dyn Folder, String),
}

/// The output format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// `model.safetensors`, or shards of at most `max_shard` bytes plus an index.
    Safetensors {
        /// Largest shard, in bytes.
        max_shard: Option<u64>,
    },
    /// One torch.save archive with this file name.
    TorchSave {
        /// File name inside the output folder.
        name: String,
    },
}

/// Everything a conversion is asked to do.
#[derive(Debug, Clone)]
pub struct ConversionOptions {
    /// What the plan keeps and how it casts.
    pub plan: PlanOptions,
    /// The output format.
    pub output: Output,
    /// Only this kind of checkpoint is accepted (`mg2hf`: Megatron).
    pub expect: Option<InputKind>,
    /// The checkpoint's tensors are written as saved (`dcp-to-pt`, as RLinf's convert_dcp_to_pt.py): a DCP folder
    /// whatever wrote it (a Megatron torch_dist folder keeps its stacked tensors, as torch's `dcp_to_torch_save`
    /// does), and no LoRA merge or base-model checks.
    pub as_saved: bool,
    /// Per-model save helpers: the model type (e.g. `openvla_oft`) and the flags it reads (e.g. `use_film`).
    pub model_type: Option<(String, Vec<String>)>,
}

impl Default for ConversionOptions {
    fn default() -> Self {
        ConversionOptions {
            plan: PlanOptions::default(),
            output: Output::Safetensors { max_shard: None },
            expect: None,
            as_saved: false,
            model_type: None,
        }
    }
}

/// Plans what `checkpoint` holds, as `opts` asks (no LoRA handling, no output layout: what `inspect` shows).
pub fn plan(checkpoint: Checkpoint, base: Option<&BaseModel>, opts: &ConversionOptions) -> Result<Planned> {
    let (planned, shown) = match checkpoint {
        Checkpoint::File(mut input) => {
            input.allowed_globals = opts.plan.allow_globals.clone();
            let shown = input.name.clone();
            // Every error names a file: the input's name unless the reader named a more specific one.
            (detect::plan_file(input, &opts.plan).map_err(|e| e.in_file(&shown))?, shown)
        }
        Checkpoint::Folder(folder) => {
            // Every file opened below may call what the user allows, and nothing more.
            let trusting = Trusting { folder, allowed: opts.plan.allow_globals.clone() };
            let folder: &dyn Folder = &trusting;
            let files = folder.files();
            let planned = if opts.as_saved && files.iter().any(|f| f == ".metadata") {
                let mut p = crate::dcp::plan(folder, "", &opts.plan)?;
                if crate::megatron::is_dist(&files, "") {
                    p.plan
                        .notes
                        .push("a Megatron torch_dist checkpoint, written as saved; `mg2hf` converts it to HF".into());
                }
                p
            } else {
                detect::plan_folder(folder, base, &opts.plan).map_err(|e| e.in_file(folder.name()))?
            };
            (planned, folder.name().to_string())
        }
        Checkpoint::Member(folder, rel) => {
            let trusting = Trusting { folder, allowed: opts.plan.allow_globals.clone() };
            let shown = crate::io::join(folder.name(), &rel);
            (detect::plan_member(&trusting, &rel, &opts.plan).map_err(|e| e.in_file(&shown))?, shown)
        }
    };
    if let Some(kind) = opts.expect
        && planned.kind != kind
    {
        return Err(Error::new(ErrorKind::NotCheckpoint(format!(
            "mg2hf converts Megatron checkpoints, and this is a {}",
            planned.format
        )))
        .in_file(&shown));
    }
    Ok(planned)
}

/// A planned conversion: the plan, the save-helper plans and every output file with its segments.
pub struct Conversion {
    planned: Planned,
    helpers: Vec<Plan>,
    files: Vec<OutputFile>,
    adapter: bool,
}

impl Conversion {
    /// Plans `checkpoint` and lays out every output file.
    pub fn new(checkpoint: Checkpoint, base: Option<&BaseModel>, opts: &ConversionOptions) -> Result<Conversion> {
        let (shown, around) = match &checkpoint {
            Checkpoint::File(input) => (input.name.clone(), None),
            Checkpoint::Folder(folder) => (folder.name().to_string(), Some(*folder)),
            Checkpoint::Member(folder, rel) => (crate::io::join(folder.name(), rel), Some(*folder)),
        };
        let planned = plan(checkpoint, base, opts)?;
        // A Hugging Face folder is its own base model: its config and tokenizer go with the converted weights.
        let trusting = around.map(|folder| Trusting { folder, allowed: opts.plan.allow_globals.clone() });
        let own = match (&trusting, base) {
            (Some(t), None)
                if planned.kind == InputKind::HfWeights && t.folder.files().iter().any(|f| f == "config.json") =>
            {
                Some(BaseModel { own: true, ..BaseModel::open(t)? })
            }
            _ => None,
        };
        let base = base.or(own.as_ref());
        // LoRA and layout errors are about the checkpoint's tensors: they name it (the base model's checks name
        // the base's files themselves).
        Conversion::from_planned(planned, base, opts).map_err(|e| e.in_file(&shown))
    }

    /// Lays out every output file of an existing plan: LoRA merge or adapter export, the checks against the base
    /// model, the model files, save-helper files, the adapter config, then the base model's files.
    pub fn from_planned(
        mut planned: Planned,
        base: Option<&BaseModel>,
        opts: &ConversionOptions,
    ) -> Result<Conversion> {
        let (adapter_config, dequantized) =
            if opts.as_saved { (None, false) } else { finish(&mut planned, base, &opts.plan)? };
        let adapter = adapter_config.is_some();
        let mut files = match &opts.output {
            Output::Safetensors { max_shard } => {
                let mut layout = safetensors::layout(&planned.plan, *max_shard)?;
                if adapter {
                    safetensors::as_adapter(&mut layout)?;
                }
                layout.into_files(0)
            }
            Output::TorchSave { name } => {
                if adapter {
                    return Err(Error::new(ErrorKind::Unsupported(format!(
                        "a torch.save output is one merged {name} (no shards, no adapter)"
                    ))));
                }
                vec![torch_save_file(&planned.plan, name, 0)?]
            }
        };
        let mut helpers = Vec::new();
        if let (Some((model_type, flags)), false) = (&opts.model_type, adapter) {
            for h in hf::save_helpers(model_type, &|f| flags.iter().any(|x| x == f)) {
                helpers.push(sub_plan(&planned.plan, &h.prefix));
                files.push(torch_save_file(&helpers[helpers.len() - 1], &h.file, helpers.len())?);
            }
        }
        if let Some(cfg) = adapter_config {
            files.push(OutputFile {
                name: ADAPTER_CONFIG.into(),
                size: cfg.len() as u64,
                segments: vec![Segment::Bytes(cfg)],
            });
        }
        if let Some(b) = base {
            for name in &b.files {
                let input = b.folder.open(name)?;
                // config.json says what the weights are now: the new dtype after a cast, no quantization once
                // dequantized. Only those values change; the rest stays the base's bytes.
                let cast = opts.plan.dtype.filter(|_| !opts.as_saved);
                if name == "config.json" && (cast.is_some() || dequantized) {
                    let bytes = input.read_vec(0, input.len())?;
                    if let Some(edited) = hf::output_config(&bytes, cast, dequantized) {
                        files.push(OutputFile {
                            name: name.clone(),
                            size: edited.len() as u64,
                            segments: vec![Segment::Bytes(edited)],
                        });
                        continue;
                    }
                }
                files.push(OutputFile {
                    name: name.clone(),
                    size: input.len(),
                    segments: vec![Segment::Input(planned.inputs.len())],
                });
                planned.inputs.push(input);
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = files.iter().find(|f| !seen.insert(f.name.as_str())) {
            return Err(Error::new(ErrorKind::Output(format!("two outputs are both named {}", dup.name))));
        }
        Ok(Conversion { planned, helpers, files, adapter })
    }

    /// The plan and what was detected.
    pub fn planned(&self) -> &Planned {
        &self.planned
    }

    /// The inputs the plans read (for the fuzzing entry points, which read bands themselves).
    #[doc(hidden)]
    pub fn inputs_for_fuzzing(&self) -> &[Input] {
        &self.planned.inputs
    }

    /// The model's plan.
    pub fn plan(&self) -> &Plan {
        &self.planned.plan
    }

    /// Whether the output is a PEFT adapter export (in [`safetensors::ADAPTER_DIR`]).
    pub fn is_adapter(&self) -> bool {
        self.adapter
    }

    /// Writes output files `which` (indices into [`OutputSet::files`], in that order: every file, one part of a
    /// split ([`crate::write::parts`]) or the finishing files) into `sink`; the caller commits. `progress` gets the
    /// tensor bytes done so far ([`crate::write::parts::Subset::tensor_bytes`] in all).
    pub fn write_files(&self, which: &[usize], sink: &mut dyn Sink, progress: &mut dyn FnMut(u64)) -> Result<()> {
        crate::write::drive(&crate::write::parts::Subset::new(self, which), sink, progress)
    }
}

impl OutputSet for Conversion {
    fn files(&self) -> &[OutputFile] {
        &self.files
    }
    fn plan(&self, i: usize) -> Option<&Plan> {
        match i {
            0 => Some(&self.planned.plan),
            _ => self.helpers.get(i - 1),
        }
    }
    fn inputs(&self) -> &[Input] {
        &self.planned.inputs
    }
}

/// The torch.save archive of `plan` as file `name` (entries under the file's stem, as torch names them).
fn torch_save_file(plan: &Plan, name: &str, index: usize) -> Result<OutputFile> {
    // The file stem as std::path::Path::file_stem gives it ("archive" when there is none).
    let file = name.rsplit('/').next().unwrap_or(name);
    let stem = match file.rfind('.') {
        _ if file.is_empty() || file == ".." => "archive",
        Some(0) | None => file,
        Some(i) => &file[..i],
    };
    let root = stem.replace(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'), "_");
    Ok(TorchSaveLayout::new(plan, &root)?.into_output_file(name, index))
}

/// The tensors under `prefix`, renamed without it (for save helpers).
fn sub_plan(plan: &Plan, prefix: &str) -> Plan {
    let tensors = plan
        .tensors
        .iter()
        .filter_map(|t| t.name.strip_prefix(prefix).map(|n| PlannedTensor { name: n.to_string(), ..t.clone() }))
        .collect();
    Plan { tensors, notes: Vec::new() }
}

/// Applies what comes after planning: dequantizes FP8 weights when casting, merges or exports LoRA, then, against
/// the base model, drops tied copies as `save_pretrained` does and checks names and shapes. Returns the
/// `adapter_config.json` bytes in adapter mode, and whether FP8 weights were dequantized.
fn finish(planned: &mut Planned, base: Option<&BaseModel>, opts: &PlanOptions) -> Result<(Option<Vec<u8>>, bool)> {
    let dequantized = match hf::dequantize(&mut planned.plan, base, opts.dtype, &planned.inputs)? {
        Some(n) => {
            planned.plan.notes.push(n);
            true
        }
        None => false,
    };
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
        if let Some(n) = hf::drop_tied(&mut planned.plan, b, &planned.inputs)? {
            planned.plan.notes.push(n);
        }
        if let Some(n) = hf::follow_base_prefixes(&mut planned.plan, b)? {
            planned.plan.notes.push(n);
        }
        if let Some(n) = hf::follow_base_expert_names(&mut planned.plan, b)? {
            planned.plan.notes.push(n);
        }
        if let Some(n) = hf::check_against_base(&planned.plan, b, opts.allow_mismatch, dequantized)? {
            planned.plan.notes.push(n);
        }
    }
    Ok((adapter, dequantized))
}
