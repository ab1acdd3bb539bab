//! The base Hugging Face model folder: its config, and the files every output folder gets a copy of.
//!
//! Config, generation config, tokenizer, chat template, processor files, `dataset_statistics.json` and
//! remote-code `*.py` are copied; the base model's weights and weight index never are.

use crate::error::{Error, ErrorKind, Result, some_names};
use crate::io::Folder;
use crate::write::Sink;

mod config_json;
mod fp8;
mod tied;

pub use config_json::output_config;
pub use fp8::dequantize;
pub use tied::drop_tied;

/// Whether a top-level file of a base model folder belongs in the output.
pub fn is_package_file(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "added_tokens.json",
        "merges.txt",
        "chat_template.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "dataset_statistics.json",
    ];
    EXACT.contains(&name)
        || name.starts_with("vocab.")
        || name.ends_with(".tiktoken")
        || (name.ends_with(".py") && !name.contains('/'))
}

/// A base model folder.
pub struct BaseModel<'f> {
    /// The folder.
    pub folder: &'f dyn Folder,
    /// Its parsed `config.json`.
    pub config: serde_json::Value,
    /// The files to copy, sorted.
    pub files: Vec<String>,
    /// The checkpoint's own folder (a Hugging Face folder converted as it is): nothing to check against.
    pub own: bool,
}

impl<'f> BaseModel<'f> {
    /// Reads `config.json` and lists the files to copy.
    pub fn open(folder: &'f dyn Folder) -> Result<BaseModel<'f>> {
        let files = folder.files();
        if !files.iter().any(|f| f == "config.json") {
            return Err(Error::new(ErrorKind::NotCheckpoint("the base model folder has no config.json".into()))
                .in_file(folder.name()));
        }
        let input = folder.open("config.json")?;
        if input.len() > 16 << 20 {
            return Err(Error::new(ErrorKind::Limit("config.json larger than 16 MiB".into())).in_file(&input.name));
        }
        let bytes = input.read_vec(0, input.len())?;
        let config: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(ErrorKind::NotCheckpoint(format!("config.json is not valid JSON: {e}"))).in_file(&input.name)
        })?;
        let mut files: Vec<String> = files.into_iter().filter(|f| is_package_file(f)).collect();
        files.sort();
        Ok(BaseModel { folder, config, files, own: false })
    }

    /// An integer field of the config (also looked up in `text_config` for multimodal configs).
    pub fn int(&self, key: &str) -> Option<u64> {
        self.config.get(key).or_else(|| self.config.get("text_config").and_then(|t| t.get(key)))?.as_u64()
    }

    /// A boolean field of the config.
    pub fn flag(&self, key: &str) -> Option<bool> {
        self.config.get(key).or_else(|| self.config.get("text_config").and_then(|t| t.get(key)))?.as_bool()
    }

    /// A string field of the config.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.config.get(key)?.as_str()
    }

    /// Sizes of the files to copy, for reports and progress.
    pub fn copy_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for f in &self.files {
            total += self.folder.open(f)?.len();
        }
        Ok(total)
    }

    /// Streams every package file into `sink` (the caller commits).
    pub fn copy_into(&self, sink: &mut dyn Sink) -> Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        for f in &self.files {
            let input = self.folder.open(f)?;
            sink.begin(f, input.len())?;
            let mut at = 0u64;
            while at < input.len() {
                let n = (input.len() - at).min(buf.len() as u64) as usize;
                input.read_exact_at(at, &mut buf[..n])?;
                sink.write(&buf[..n])?;
                at += n as u64;
            }
            sink.end()?;
        }
        Ok(())
    }
}

impl BaseModel<'_> {
    /// Names and shapes of the base model's own weights, from its safetensors headers (single file or
    /// index + shards) or its `pytorch_model.bin`; `None` when the folder holds no weights.
    pub fn weight_shapes(&self) -> Result<Option<std::collections::BTreeMap<String, Vec<u64>>>> {
        let all = self.folder.files();
        let has = |n: &str| all.iter().any(|f| f == n);
        let mut files: Vec<String> = Vec::new();
        if has("model.safetensors.index.json") {
            let input = self.folder.open("model.safetensors.index.json")?;
            let bytes = input.read_vec(0, input.len().min(64 << 20))?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                Error::new(ErrorKind::NotCheckpoint(format!("bad index JSON: {e}"))).in_file(&input.name)
            })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                Error::new(ErrorKind::NotCheckpoint("index has no weight_map".into())).in_file(&input.name)
            })?;
            let mut set: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            set.sort();
            set.dedup();
            files = set;
        } else if has("model.safetensors") {
            files.push("model.safetensors".into());
        }
        let mut shapes = std::collections::BTreeMap::new();
        for f in &files {
            let input = self.folder.open(f)?;
            let header = crate::safetensors_header::read_file(&input)?;
            for (name, e) in header.tensors {
                shapes.insert(name, e.shape);
            }
        }
        if files.is_empty() {
            if !has("pytorch_model.bin") {
                return Ok(None);
            }
            let mut input = self.folder.open("pytorch_model.bin")?;
            let file = crate::torch::TorchFile::open(&mut input)?;
            for t in file.tensors(&input, 0)? {
                shapes.insert(t.path.name, t.view.shape);
            }
        }
        Ok(Some(shapes))
    }
}

/// The name endings of transformers 5's fused expert tensors: gate and up, then down.
const FUSED_EXPERTS: [&str; 2] = [".experts.gate_up_proj", ".experts.down_proj"];

/// transformers 5 holds a Mixture-of-Experts layer's experts fused (`P.experts.gate_up_proj` `[E, 2F, H]`, gate
/// rows first, and `P.experts.down_proj` `[E, H, F]`; its conversion_mapping.py), and so do checkpoints of its
/// `state_dict()`, while the Hub's files (and `save_pretrained`) name them per expert. When the base model's own
/// weights name them per expert (`P.experts.E.{gate,up,down}_proj.weight`, or Mixtral's
/// `block_sparse_moe.experts.E.{w1,w3,w2}.weight` with its router `block_sparse_moe.gate.weight`), the fused
/// tensors become per-expert views of the same bytes under those names. Returns a note for the report.
pub fn follow_base_expert_names(plan: &mut crate::plan::Plan, base: &BaseModel) -> Result<Option<String>> {
    if !plan.tensors.iter().any(|t| FUSED_EXPERTS.iter().any(|s| t.name.ends_with(s))) {
        return Ok(None);
    }
    let Some(want) = base.weight_shapes()? else { return Ok(None) };
    // (fused module prefix's `.mlp` replaced by, gate, up, down) in the base's per-expert naming.
    let schemes = [(".mlp", ["gate_proj", "up_proj", "down_proj"]), (".block_sparse_moe", ["w1", "w3", "w2"])];
    let mut out = Vec::with_capacity(plan.tensors.len());
    let mut split = 0usize;
    for t in std::mem::take(&mut plan.tensors) {
        let fused = FUSED_EXPERTS.iter().enumerate().find_map(|(k, s)| Some((k, t.name.strip_suffix(s)?)));
        let scheme = fused.and_then(|(k, module)| {
            let (parent, _) = module.rsplit_once('.')?;
            schemes.iter().find_map(|(block, names)| {
                let prefix = format!("{parent}{block}.experts");
                want.contains_key(&format!("{prefix}.0.{}.weight", names[0])).then_some((k, prefix, names))
            })
        });
        let Some((k, prefix, names)) = scheme.filter(|_| !want.contains_key(&t.name)) else {
            out.push(t);
            continue;
        };
        let [e, rows, _] = t.shape[..] else {
            let msg = format!("{:?}: a fused expert tensor is [experts, rows, columns]", t.shape);
            return Err(crate::error::tensor_err(&t.name, msg));
        };
        // gate_up_proj: each expert's first half of rows is its gate, the second its up projection.
        let parts: Vec<(&str, u64, u64)> = match k {
            0 if rows % 2 == 0 => vec![(names[0], 0, rows / 2), (names[1], rows / 2, rows)],
            0 => return Err(crate::error::tensor_err(&t.name, format!("an odd number of gate/up rows ({rows})"))),
            _ => vec![(names[2], 0, rows)],
        };
        for x in 0..e {
            for &(n, a, b) in &parts {
                let name = format!("{prefix}.{x}.{n}.weight");
                let source = t.source.slice(&t.name, x, (a, b)).ok_or_else(|| {
                    crate::error::tensor_err(&t.name, "a LoRA-merged expert tensor cannot be split per expert")
                })??;
                let mut shape = t.shape[1..].to_vec();
                shape[0] = b - a;
                out.push(crate::plan::PlannedTensor::from_source(name, shape, source, Some(t.dtype)));
            }
        }
        split += 1;
    }
    plan.tensors = out;
    // Mixtral's router sits under block_sparse_moe in the base's names and under mlp in transformers 5's.
    let mut renamed = 0usize;
    for t in &mut plan.tensors {
        if let Some(layer) = t.name.strip_suffix(".mlp.gate.weight") {
            let to = format!("{layer}.block_sparse_moe.gate.weight");
            if want.contains_key(&to) && !want.contains_key(&t.name) {
                t.name = to;
                renamed += 1;
            }
        }
    }
    if split == 0 && renamed == 0 {
        return Ok(None);
    }
    let routers = if renamed > 0 { format!(" and {renamed} routers renamed") } else { String::new() };
    Ok(Some(format!("{split} fused expert tensors split per expert{routers}, as the base model's weights name them")))
}

/// transformers 5 nests a multimodal model's parts under `model.` in its `state_dict()` (its conversion_mapping.py),
/// so checkpoints of a training run name them so, while `save_pretrained` and the Hub's files name them as
/// transformers 4 did. Each pair is (state-dict prefix, file prefix); a rule applies to a tensor only when the base
/// model's own weights hold the renamed name and not the original.
const NESTED_PREFIXES: [(&str, &str); 8] = [
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_model.", "vision_model."),
    ("model.text_model.", "text_model."),
];

/// Renames tensors of a multimodal checkpoint to the names the base model's own weights use ([`NESTED_PREFIXES`]).
/// Returns a note for the report.
pub fn follow_base_prefixes(plan: &mut crate::plan::Plan, base: &BaseModel) -> Result<Option<String>> {
    let could = |n: &str| NESTED_PREFIXES.iter().any(|(from, _)| n.starts_with(from));
    if !plan.tensors.iter().any(|t| could(&t.name)) {
        return Ok(None);
    }
    let Some(want) = base.weight_shapes()? else { return Ok(None) };
    let mut renamed: Vec<(&str, &str, usize)> = Vec::new();
    for t in &mut plan.tensors {
        if want.contains_key(&t.name) {
            continue;
        }
        let to = NESTED_PREFIXES.iter().find_map(|&(from, to)| {
            let rest = t.name.strip_prefix(from)?;
            let name = format!("{to}{rest}");
            want.contains_key(&name).then_some((from, to, name))
        });
        if let Some((from, to, name)) = to {
            t.name = name;
            match renamed.iter_mut().find(|r| r.0 == from && r.1 == to) {
                Some(r) => r.2 += 1,
                None => renamed.push((from, to, 1)),
            }
        }
    }
    if renamed.is_empty() {
        return Ok(None);
    }
    let what: Vec<String> = renamed.iter().map(|(f, t, n)| format!("{f}* -> {t}* ({n})")).collect();
    Ok(Some(format!("renamed as the base model's weights name them: {}", what.join(", "))))
}

/// Compares the planned names and shapes with the base model's own weights: a missing or unexpected
/// tensor, or a different shape, is an error unless `allow` is set (then it is only reported).
/// A base holding FP8 weights names their scales, which a dequantized output no longer has.
pub fn check_against_base(
    plan: &crate::plan::Plan,
    base: &BaseModel,
    allow: bool,
    dequantized: bool,
) -> Result<Option<String>> {
    if base.own {
        return Ok(None);
    }
    let Some(mut want) = base.weight_shapes()? else {
        return Ok(Some("the base folder has no weights to check names and shapes against".into()));
    };
    if dequantized {
        want.retain(|k, _| !(k.ends_with("_scale_inv") || k.ends_with(".weight_scale") || k.ends_with(".input_scale")));
    }
    let tied = base.flag("tie_word_embeddings") == Some(true);
    let have: std::collections::BTreeMap<&str, &Vec<u64>> =
        plan.tensors.iter().map(|t| (t.name.as_str(), &t.shape)).collect();
    let missing: Vec<&String> = want.keys().filter(|k| !have.contains_key(k.as_str())).collect();
    let extra: Vec<&&str> =
        have.keys().filter(|k| !(want.contains_key(**k) || (tied && **k == "lm_head.weight"))).collect();
    let reshaped: Vec<String> = want
        .iter()
        .filter_map(|(k, s)| have.get(k.as_str()).filter(|h| **h != s).map(|h| format!("{k} {h:?} (base {s:?})")))
        .collect();
    if missing.is_empty() && extra.is_empty() && reshaped.is_empty() {
        return Ok(Some(format!("names and shapes match the base model's {} weights", want.len())));
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing {}: {}", missing.len(), some_names(&missing, 8)));
    }
    if !extra.is_empty() {
        parts.push(format!("unexpected {}: {}", extra.len(), some_names(&extra, 8)));
    }
    if !reshaped.is_empty() {
        parts.push(format!("different shape {}: {}", reshaped.len(), some_names(&reshaped, 8)));
    }
    let msg = format!("the output does not match the base model's weights ({})", parts.join("; "));
    if allow {
        return Ok(Some(format!("{msg}; allowed by --allow-mismatch")));
    }
    Err(Error::new(ErrorKind::Output(format!("{msg}; pass --allow-mismatch to write it anyway")))
        .in_file(base.folder.name()))
}

/// A per-model save helper: extra torch.save files RLinf writes next to the HF folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraPt {
    /// File name in the output folder.
    pub file: String,
    /// Tensors under this prefix go in it, with the prefix stripped.
    pub prefix: String,
}

/// The save helpers of `model_type` given its flags (`use_film`, `use_proprio`); adding a model type is
/// one entry here.
pub fn save_helpers(model_type: &str, flags: &dyn Fn(&str) -> bool) -> Vec<ExtraPt> {
    let mk = |file: &str, prefix: &str| ExtraPt { file: file.into(), prefix: prefix.into() };
    match model_type {
        "openvla_oft" => {
            let mut v = Vec::new();
            if flags("use_film") {
                v.push(mk("vision_backbone--0_checkpoint.pt", "vision_backbone."));
            }
            if flags("use_proprio") {
                v.push(mk("proprio_projector--0_checkpoint.pt", "proprio_projector."));
            }
            v
        }
        _ => Vec::new(),
    }
}
