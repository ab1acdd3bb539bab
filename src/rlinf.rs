//! RLinf's `fsdp_model_convertor.yaml` (the Hydra config of `convert_pt_to_hf.py`), read without Hydra.
//!
//! The keys the original script uses are read, including its misspelled `merge_lora_weighs`. Hydra
//! `defaults:` entries of the form `group/name@package` are merged from `group/name.yaml` beside the file
//! when it exists (the file's own keys win); entries that cannot be resolved (e.g. `override hydra/...`)
//! are ignored and reported.

use crate::error::{Error, ErrorKind, Result};
use yaml_rust2::{Yaml, YamlLoader};

/// What the config asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConvertorConfig {
    /// `convertor.save_path`
    pub save_path: Option<String>,
    /// `convertor.merge_lora_weighs` (sic)
    pub merge_lora: Option<bool>,
    /// `convertor.ckpt_path`
    pub ckpt_path: Option<String>,
    /// `model.model_type`
    pub model_type: Option<String>,
    /// `model.model_path`
    pub model_path: Option<String>,
    /// `model.is_lora`
    pub is_lora: Option<bool>,
    /// `model.lora_rank`
    pub lora_rank: Option<u64>,
    /// `model.lora_path`
    pub lora_path: Option<String>,
    /// `model.use_film`
    pub use_film: Option<bool>,
    /// `model.use_proprio`
    pub use_proprio: Option<bool>,
    /// What was merged or ignored while reading.
    pub notes: Vec<String>,
}

fn bad(msg: String) -> Error {
    Error::new(ErrorKind::Config(msg))
}

fn load(text: &str) -> Result<Yaml> {
    let mut docs = YamlLoader::load_from_str(text).map_err(|e| bad(e.to_string()))?;
    Ok(if docs.is_empty() { Yaml::Hash(Default::default()) } else { docs.swap_remove(0) })
}

/// `b` merged over `a`, recursively for mappings.
fn merge(a: Yaml, b: Yaml) -> Yaml {
    match (a, b) {
        (Yaml::Hash(mut x), Yaml::Hash(y)) => {
            for (k, v) in y {
                let merged = match x.remove(&k) {
                    Some(old) => merge(old, v),
                    None => v,
                };
                x.insert(k, merged);
            }
            Yaml::Hash(x)
        }
        (_, b) => b,
    }
}

fn get<'y>(y: &'y Yaml, path: &[&str]) -> Option<&'y Yaml> {
    path.iter().try_fold(y, |node, k| match &node[*k] {
        Yaml::BadValue => None,
        v => Some(v),
    })
}

fn text(y: &Yaml, path: &[&str]) -> Option<String> {
    match get(y, path)? {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn flag(y: &Yaml, path: &[&str]) -> Result<Option<bool>> {
    match get(y, path) {
        None | Some(Yaml::Null) => Ok(None),
        Some(Yaml::Boolean(b)) => Ok(Some(*b)),
        Some(Yaml::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Yaml::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(other) => Err(bad(format!("{} must be true or false, not {other:?}", path.join(".")))),
    }
}

/// Parses the config text; `read` returns the text of a file relative to the config's folder, if it exists.
pub fn parse(text_in: &str, read: &dyn Fn(&str) -> Option<String>) -> Result<ConvertorConfig> {
    let main = load(text_in)?;
    let mut notes = Vec::new();
    let mut merged = Yaml::Hash(Default::default());
    if let Yaml::Array(entries) = &main["defaults"] {
        for e in entries {
            let entry = match e {
                Yaml::String(s) => s.clone(),
                Yaml::Hash(h) => h
                    .iter()
                    .map(|(k, v)| format!("{}: {}", k.as_str().unwrap_or("?"), v.as_str().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => continue,
            };
            if entry == "_self_" {
                continue;
            }
            // group/name@package -> group/name.yaml placed under `package` (default: the group).
            let (spec, package) = match entry.split_once('@') {
                Some((s, p)) => (s.to_string(), Some(p.to_string())),
                None => (entry.clone(), None),
            };
            let resolved =
                (!entry.contains(':') && spec.contains('/')).then(|| read(&format!("{spec}.yaml"))).flatten();
            match resolved {
                Some(t) => {
                    let node = load(&t)?;
                    let pkg = package.unwrap_or_else(|| spec.split('/').next().unwrap_or("").to_string());
                    let mut h = yaml_rust2::yaml::Hash::new();
                    h.insert(Yaml::String(pkg.clone()), node);
                    merged = merge(merged, Yaml::Hash(h));
                    notes.push(format!("defaults: merged {spec}.yaml into '{pkg}'"));
                }
                None => notes.push(format!("defaults: ignored '{entry}' (Hydra-only or not found beside the config)")),
            }
        }
    }
    let y = merge(merged, main);
    let cfg = ConvertorConfig {
        save_path: text(&y, &["convertor", "save_path"]),
        merge_lora: flag(&y, &["convertor", "merge_lora_weighs"])?.or(flag(&y, &["convertor", "merge_lora_weights"])?),
        ckpt_path: text(&y, &["convertor", "ckpt_path"]),
        model_type: text(&y, &["model", "model_type"]),
        model_path: text(&y, &["model", "model_path"]),
        is_lora: flag(&y, &["model", "is_lora"])?,
        lora_rank: match get(&y, &["model", "lora_rank"]) {
            Some(Yaml::Integer(i)) if *i > 0 => Some(*i as u64),
            None | Some(Yaml::Null) => None,
            Some(other) => return Err(bad(format!("model.lora_rank must be a positive integer, not {other:?}"))),
        },
        lora_path: text(&y, &["model", "lora_path"]),
        use_film: flag(&y, &["model", "use_film"])?,
        use_proprio: flag(&y, &["model", "use_proprio"])?,
        notes,
    };
    for (key, v) in [
        ("convertor.save_path", &cfg.save_path),
        ("convertor.ckpt_path", &cfg.ckpt_path),
        ("model.model_path", &cfg.model_path),
    ] {
        if v.as_deref().is_some_and(|s| s.contains("${")) {
            return Err(bad(format!(
                "{key} uses a Hydra interpolation, which ckptconv does not evaluate; write the path out"
            )));
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RLINF: &str = r#"
defaults:
  - model/openvla_oft@model
  - override hydra/job_logging: stdout

convertor:
  save_path: /out
  merge_lora_weighs: True
  ckpt_path: /in/full_weights.pt

model:
  model_type: "openvla_oft"
  model_path: "/base/"
  is_lora: True
"#;

    #[test]
    fn reads_the_original_keys_and_merges_resolvable_defaults() {
        let cfg = parse(RLINF, &|p| {
            (p == "model/openvla_oft.yaml").then(|| "use_film: true\nlora_rank: 32\nis_lora: false\n".into())
        })
        .unwrap();
        assert_eq!(cfg.save_path.as_deref(), Some("/out"));
        assert_eq!(cfg.merge_lora, Some(true));
        assert_eq!(cfg.ckpt_path.as_deref(), Some("/in/full_weights.pt"));
        assert_eq!(cfg.model_type.as_deref(), Some("openvla_oft"));
        assert_eq!(cfg.is_lora, Some(true), "the file's own keys override the defaults");
        assert_eq!(cfg.use_film, Some(true));
        assert_eq!(cfg.lora_rank, Some(32));
        assert!(cfg.notes.iter().any(|n| n.contains("ignored 'override hydra/job_logging: stdout'")));
    }

    #[test]
    fn unresolvable_defaults_are_reported_not_fatal() {
        let cfg = parse(RLINF, &|_| None).unwrap();
        assert!(cfg.notes.iter().any(|n| n.contains("ignored 'model/openvla_oft@model'")));
        assert_eq!(cfg.use_film, None);
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(parse("model:\n  is_lora: maybe\n", &|_| None).is_err());
        assert!(parse("convertor: [\n", &|_| None).is_err());
    }
}
