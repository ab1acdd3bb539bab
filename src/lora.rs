//! PEFT LoRA state dicts: merge the adapters into the base weights, or export them as a PEFT adapter.
//!
//! PEFT names a wrapped module's tensors `base_model.model.<m>.base_layer.weight`, `<m>.lora_A.<adapter>.weight`
//! (`[r, in]`) and `<m>.lora_B.<adapter>.weight` (`[out, r]`). Merging writes `<m>.weight = W + (alpha/r)·B·A`,
//! computed per band of rows in f32 and rounded once to the output dtype; everything else keeps its tensor
//! with the PEFT wrapping removed from its name. `alpha` and `r` come from the user, else from an
//! `adapter_config.json`, else RLinf's choice (`alpha = r`).

use crate::error::{Error, ErrorKind, Result, tensor_err};
use crate::plan::{LoraMerge, Plan, PlannedTensor, Source};
use std::collections::BTreeMap;

/// What to do with LoRA tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMode {
    /// Merge into the base weights (the default when LoRA tensors exist).
    #[default]
    Merge,
    /// Keep only the adapter, as a PEFT `adapter_model.safetensors`.
    Adapter,
}

/// LoRA settings; fields left `None` are looked up as described in the module docs.
#[derive(Debug, Clone, Default)]
pub struct LoraOptions {
    /// Merge or export.
    pub mode: LoraMode,
    /// The user chose the mode (then a checkpoint without LoRA tensors is an error).
    pub explicit: bool,
    /// `lora_alpha`.
    pub alpha: Option<f64>,
    /// `r`.
    pub r: Option<u64>,
    /// Where `r` came from, for messages (default: `--lora-r`).
    pub r_origin: Option<String>,
    /// An `adapter_config.json` found next to the checkpoint or the base model.
    pub adapter_config: Option<serde_json::Value>,
}

/// Largest `adapter_config.json` read (PEFT writes about a kilobyte).
const MAX_ADAPTER_CONFIG: u64 = 1 << 20;

/// Reads and parses an `adapter_config.json`. A malformed one is an error, never ignored: its `lora_alpha` and `r`
/// decide the merge.
pub fn read_adapter_config(input: &crate::io::Input) -> Result<serde_json::Value> {
    let bad = |m: String| Error::new(ErrorKind::Config(m)).in_file(&input.name);
    if input.len() > MAX_ADAPTER_CONFIG {
        return Err(bad(format!("{} bytes is too large for an adapter_config.json", input.len())));
    }
    let bytes = input.read_vec(0, input.len())?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    Ok(v)
}

const PREFIX: &str = "base_model.model.";

/// The parts of a PEFT name: `(module, kind, adapter)` for LoRA tensors.
fn lora_parts(name: &str) -> Option<(&str, &str, &str)> {
    for kind in ["lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"] {
        let tag = format!(".{kind}.");
        if let Some(i) = name.find(&tag) {
            let rest = &name[i + tag.len()..];
            let adapter = rest.split('.').next().unwrap_or("");
            return Some((&name[..i], kind, adapter));
        }
    }
    None
}

/// Whether the plan holds PEFT LoRA tensors.
pub fn has_lora(plan: &Plan) -> bool {
    plan.tensors.iter().any(|t| lora_parts(&t.name).is_some())
}

/// The plain HF name of a PEFT-wrapped tensor.
fn plain_name(name: &str) -> String {
    let n = name.strip_prefix(PREFIX).unwrap_or(name);
    n.replace(".base_layer.", ".")
}

/// Where `alpha` and `r` came from, for the report.
fn resolve_alpha_r(opts: &LoraOptions, r_seen: u64) -> Result<(f64, u64, bool, String)> {
    let cfg = opts.adapter_config.as_ref();
    let cfg_r = cfg.and_then(|c| c.get("r")).and_then(|v| v.as_u64());
    let cfg_alpha = cfg.and_then(|c| c.get("lora_alpha")).and_then(|v| v.as_f64());
    let rslora = cfg.and_then(|c| c.get("use_rslora")).and_then(|v| v.as_bool()).unwrap_or(false);
    let (r, r_from) = match (opts.r, cfg_r) {
        (Some(r), _) => (r, opts.r_origin.as_deref().unwrap_or("--lora-r")),
        (None, Some(r)) => (r, "adapter_config.json"),
        (None, None) => (r_seen, "the lora_A shapes"),
    };
    if r != r_seen {
        return Err(Error::new(ErrorKind::Inconsistent(format!(
            "the LoRA tensors have rank {r_seen} but {r_from} says r = {r}"
        ))));
    }
    let (alpha, alpha_from) = match (opts.alpha, cfg_alpha) {
        (Some(a), _) => (a, "--lora-alpha".to_string()),
        (None, Some(a)) => (a, "adapter_config.json".to_string()),
        (None, None) => (r as f64, "alpha = r, as RLinf builds its LoRA".to_string()),
    };
    let note = format!(
        "LoRA r = {r} (from {r_from}), alpha = {alpha} (from {alpha_from}){}",
        if rslora { ", rsLoRA" } else { "" }
    );
    Ok((alpha, r, rslora, note))
}

struct Pair {
    a: Option<PlannedTensor>,
    b: Option<PlannedTensor>,
}

/// Splits the plan into LoRA pairs by module and the other tensors; checks there is one adapter.
fn collect(plan: Plan) -> Result<(BTreeMap<String, Pair>, Vec<PlannedTensor>, String)> {
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    let mut rest = Vec::new();
    let mut adapter: Option<String> = None;
    for t in plan.tensors {
        let Some((module, kind, name)) = lora_parts(&t.name) else {
            rest.push(t);
            continue;
        };
        let module = module.to_string();
        if kind != "lora_A" && kind != "lora_B" {
            return Err(Error::new(ErrorKind::Unsupported(format!(
                "'{}': {kind} (embedding LoRA, DoRA) is not supported; only linear lora_A/lora_B",
                t.name
            ))));
        }
        match &adapter {
            Some(a) if a != name => {
                return Err(Error::new(ErrorKind::Unsupported(format!(
                    "several LoRA adapters ('{a}' and '{name}') in one checkpoint"
                ))));
            }
            _ => adapter = Some(name.to_string()),
        }
        let p = pairs.entry(module).or_insert(Pair { a: None, b: None });
        if kind == "lora_A" {
            p.a = Some(t);
        } else {
            p.b = Some(t);
        }
    }
    Ok((pairs, rest, adapter.unwrap_or_default()))
}

fn rank_of(module: &str, p: &Pair) -> Result<(u64, u64, u64)> {
    let (Some(a), Some(b)) = (&p.a, &p.b) else {
        return Err(tensor_err(module, "has only one of lora_A and lora_B"));
    };
    let (&[ra, cols], &[rows, rb]) = (a.shape.as_slice(), b.shape.as_slice()) else {
        return Err(tensor_err(module, format!("lora_A {:?} and lora_B {:?} are not matrices", a.shape, b.shape)));
    };
    if ra != rb {
        return Err(tensor_err(
            module,
            format!("lora_A has rank {ra} but lora_B has rank {rb} ({:?} vs {:?})", a.shape, b.shape),
        ));
    }
    Ok((ra, rows, cols))
}

/// Merges every LoRA pair into its base weight; a merged weight keeps its base weight's output dtype.
pub fn merge(plan: Plan, opts: &LoraOptions) -> Result<Plan> {
    let mut notes = plan.notes.clone();
    let (mut pairs, rest, _) = collect(plan)?;
    let mut r_seen = None;
    for (m, p) in &pairs {
        let (r, ..) = rank_of(m, p)?;
        match r_seen {
            Some(prev) if prev != r => {
                return Err(tensor_err(m, format!("has LoRA rank {r} but other modules have {prev}")));
            }
            _ => r_seen = Some(r),
        }
    }
    let (alpha, r, rslora, note) = resolve_alpha_r(opts, r_seen.unwrap_or(0))?;
    let scale = if rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 } as f32;
    notes.push(format!("{note}: merged W + {scale}·B·A into {} modules", pairs.len()));
    let mut out = Vec::with_capacity(rest.len());
    for t in rest {
        let Some(module) = t.name.strip_suffix(".base_layer.weight") else {
            // Dropped: PEFT's frozen copies of modules_to_save; the trained copy takes the plain name.
            if t.name.contains(".original_module.") {
                continue;
            }
            let name = plain_name(&t.name).replace(".modules_to_save.default.", ".");
            out.push(PlannedTensor { name, ..t });
            continue;
        };
        let Some(p) = pairs.remove(module) else {
            out.push(PlannedTensor { name: plain_name(&t.name), ..t });
            continue;
        };
        let (rank, rows, cols) = rank_of(module, &p)?;
        if t.shape != [rows, cols] {
            return Err(tensor_err(&t.name, format!("is {:?} but its LoRA pair implies [{rows}, {cols}]", t.shape)));
        }
        let base_dtype = t.source.dtype();
        if !base_dtype.is_castable_float() {
            return Err(tensor_err(&t.name, "LoRA on a non-float weight"));
        }
        let (Some(a), Some(b)) = (p.a, p.b) else { continue };
        let merge = LoraMerge { base: t.source, a: a.source, b: b.source, scale, rows, cols, rank, out: t.dtype };
        out.push(PlannedTensor {
            name: plain_name(&t.name),
            dtype: t.dtype,
            shape: t.shape,
            source: Source::Lora(Box::new(merge)),
        });
    }
    if let Some(m) = pairs.keys().next() {
        return Err(tensor_err(m, "has lora_A/lora_B but no base_layer.weight"));
    }
    Ok(Plan { tensors: out, notes })
}

/// Keeps only the adapter tensors, named as PEFT's `adapter_model.safetensors` names them, and returns the
/// matching `adapter_config.json`.
pub fn adapter(plan: Plan, opts: &LoraOptions, base_name: &str) -> Result<(Plan, Vec<u8>)> {
    let mut notes = plan.notes.clone();
    let (pairs, _, adapter_name) = collect(plan)?;
    let mut tensors = Vec::new();
    let mut targets = std::collections::BTreeSet::new();
    let mut r_seen = None;
    for (m, p) in pairs {
        let (r, ..) = rank_of(&m, &p)?;
        if r_seen.is_some_and(|prev| prev != r) {
            return Err(tensor_err(&m, "LoRA ranks differ between modules"));
        }
        r_seen = Some(r);
        let module = if m.starts_with(PREFIX) { m.clone() } else { format!("{PREFIX}{m}") };
        targets.insert(m.rsplit('.').next().unwrap_or(&m).to_string());
        for (kind, t) in [("lora_A", p.a), ("lora_B", p.b)] {
            let Some(t) = t else { continue };
            tensors.push(PlannedTensor { name: format!("{module}.{kind}.weight"), ..t });
        }
    }
    if tensors.is_empty() {
        return Err(Error::new(ErrorKind::NoTensors("no LoRA tensors to export".into())));
    }
    let (alpha, r, rslora, note) = resolve_alpha_r(opts, r_seen.unwrap_or(0))?;
    notes.push(format!(
        "{note}: exported adapter '{adapter_name}' for {}",
        targets.iter().cloned().collect::<Vec<_>>().join(", ")
    ));
    let mut config = opts.adapter_config.clone().unwrap_or_else(|| serde_json::json!({}));
    let defaults = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_dora": false,
    });
    if let (Some(c), Some(d)) = (config.as_object_mut(), defaults.as_object()) {
        for (k, v) in d {
            c.entry(k.clone()).or_insert(v.clone());
        }
        c.insert("r".into(), r.into());
        c.insert("lora_alpha".into(), serde_json::json!(alpha));
        c.insert("use_rslora".into(), rslora.into());
        c.insert("target_modules".into(), serde_json::json!(targets));
        c.entry("base_model_name_or_path").or_insert(base_name.into());
    }
    let mut bytes = serde_json::to_vec_pretty(&config).map_err(|e| Error::new(ErrorKind::Output(e.to_string())))?;
    bytes.push(b'\n');
    Ok((Plan { tensors, notes }, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_split_and_unwrap() {
        let n = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight";
        assert_eq!(lora_parts(n), Some(("base_model.model.model.layers.0.self_attn.q_proj", "lora_A", "default")));
        assert_eq!(
            plain_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"),
            "model.layers.0.self_attn.q_proj.weight"
        );
        assert_eq!(plain_name("base_model.model.lm_head.weight"), "lm_head.weight");
    }

    #[test]
    fn alpha_defaults_to_r_like_rlinf() {
        let (alpha, r, _, note) = resolve_alpha_r(&LoraOptions::default(), 8).unwrap();
        assert_eq!((alpha, r), (8.0, 8));
        assert!(note.contains("RLinf"));
        let opts = LoraOptions { r: Some(4), ..LoraOptions::default() };
        assert!(resolve_alpha_r(&opts, 8).unwrap_err().to_string().contains("rank 8"));
    }
}
