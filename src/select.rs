//! Choosing which tensors of a checkpoint are the model, and naming them.
//!
//! Checkpoints often wrap the weights: `{"state_dict": ..., "optimizer_states": ...}` (Lightning),
//! `{"model": ..., "optimizer": ...}` (Megatron, many trainers), `{"fsdp_checkpoint": {"model": ...}}` (RLinf's
//! DCP). By default the first of [`AUTO_PREFIXES`] that holds a nested container of tensors is taken and
//! stripped; the other groups are skipped and reported. `--prefix` chooses explicitly, and an empty prefix keeps every tensor.

use crate::error::{Error, ErrorKind, Result};
use std::collections::{HashMap, HashSet};

/// Key paths that wrap model weights, in order of preference: RLinf's DCP layout, then common trainers.
pub const AUTO_PREFIXES: [&[&str]; 5] =
    [&["fsdp_checkpoint", "model"], &["state_dict"], &["model"], &["module"], &["model_state_dict"]];

/// How to pick the model's tensors.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Prefix {
    /// Strip a wrapping key path from [`AUTO_PREFIXES`] when there is one.
    #[default]
    Auto,
    /// Keep only names under this dotted prefix, and strip it (empty: keep everything).
    Explicit(String),
}

/// What a selection kept and dropped, for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// The prefix stripped ("" when none).
    pub prefix: String,
    /// Groups left out, with their tensor counts.
    pub skipped: Vec<(String, usize)>,
}

/// A tensor's dotted name plus where its path components end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPath {
    /// Path components joined with dots.
    pub name: String,
    /// Byte offset in `name` where each component ends.
    ends: Vec<usize>,
}

impl TensorPath {
    /// Builds a path from its components.
    pub fn from_parts<S: AsRef<str>>(parts: &[S]) -> Self {
        let mut name = String::new();
        let mut ends = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                name.push('.');
            }
            name.push_str(p.as_ref());
            ends.push(name.len());
        }
        TensorPath { name, ends }
    }

    /// The first `n` components, joined (the whole name when it has fewer).
    pub fn head(&self, n: usize) -> &str {
        match n.checked_sub(1).and_then(|i| self.ends.get(i)) {
            Some(&e) => &self.name[..e],
            None if n == 0 => "",
            None => &self.name,
        }
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.ends.len()
    }

    /// Whether the path starts with exactly these components and has more after them.
    pub fn is_under(&self, comps: &[&str]) -> bool {
        self.depth() > comps.len() && {
            let mut head = self.head(comps.len());
            comps.iter().enumerate().all(|(i, c)| {
                let rest = if i == 0 { Some(head) } else { head.strip_prefix('.') };
                match rest.and_then(|r| r.strip_prefix(c)) {
                    Some(r) => {
                        head = r;
                        true
                    }
                    None => false,
                }
            }) && head.is_empty()
        }
    }
}

/// Selects and renames `items` (each a key path plus payload), returning `(name, payload)` pairs in order.
pub fn select<T>(items: Vec<(TensorPath, T)>, prefix: &Prefix) -> Result<(Vec<(String, T)>, Selection)> {
    let chosen: String = match prefix {
        Prefix::Explicit(p) => p.trim_end_matches('.').to_string(),
        Prefix::Auto => AUTO_PREFIXES
            .iter()
            .find(|c| items.iter().any(|(p, _)| p.is_under(c)))
            .map(|c| c.join("."))
            .unwrap_or_default(),
    };
    let depth = if chosen.is_empty() { 0 } else { chosen.split('.').count() };
    let mut kept = Vec::new();
    let mut skipped: Vec<(String, usize)> = Vec::new();
    // Each group's place in `skipped`: a prefix can leave a hundred thousand top-level groups out.
    let mut skipped_at: HashMap<String, usize> = HashMap::new();
    let total = items.len();
    for (path, t) in items {
        let rest = if chosen.is_empty() {
            Some(path.name.clone())
        } else {
            path.name.strip_prefix(&chosen).and_then(|r| r.strip_prefix('.')).map(str::to_string)
        };
        match rest {
            Some(r) => kept.push((r, t)),
            None => {
                let group = path.head(depth.min(path.depth().saturating_sub(1)).max(1)).to_string();
                match skipped_at.get(&group).and_then(|&i| skipped.get_mut(i)) {
                    Some((_, n)) => *n += 1,
                    None => {
                        skipped_at.insert(group.clone(), skipped.len());
                        skipped.push((group, 1));
                    }
                }
            }
        }
    }
    if kept.is_empty() && total > 0 {
        return Err(Error::new(ErrorKind::NoTensors(format!(
            "no tensor name starts with '{chosen}.' (groups: {})",
            skipped.iter().map(|(g, n)| format!("{g} ({n})")).collect::<Vec<_>>().join(", ")
        ))));
    }
    let mut seen = HashSet::new();
    for (n, _) in &kept {
        if !seen.insert(n.as_str()) {
            return Err(Error::new(ErrorKind::Tensor {
                name: n.clone(),
                msg: "two tensors map to this name (a dict key containing dots collides with a nested key)".into(),
            }));
        }
    }
    Ok((kept, Selection { prefix: chosen, skipped }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TensorPath {
        TensorPath::from_parts(&s.split('/').collect::<Vec<_>>())
    }

    #[test]
    fn auto_strips_state_dict_and_reports_the_rest() {
        let items = vec![(p("state_dict/a.weight"), 1), (p("optimizer_states/0/state/0/exp_avg"), 2)];
        let (kept, sel) = select(items, &Prefix::Auto).unwrap();
        assert_eq!(kept, vec![("a.weight".to_string(), 1)]);
        assert_eq!(sel.prefix, "state_dict");
        assert_eq!(sel.skipped, vec![("optimizer_states".to_string(), 1)]);
    }

    #[test]
    fn flat_dotted_keys_are_not_mistaken_for_a_wrapper() {
        let items = vec![(p("model.embed.weight"), 1)];
        let (kept, sel) = select(items, &Prefix::Auto).unwrap();
        assert_eq!(kept[0].0, "model.embed.weight");
        assert_eq!(sel.prefix, "");
    }

    #[test]
    fn explicit_prefix_and_empty_prefix() {
        let items = || vec![(p("fsdp_checkpoint/model/w"), 1), (p("fsdp_checkpoint/optimizers/x"), 2)];
        let (kept, _) = select(items(), &Prefix::Explicit("fsdp_checkpoint.model".into())).unwrap();
        assert_eq!(kept, vec![("w".to_string(), 1)]);
        let (kept, _) = select(items(), &Prefix::Explicit(String::new())).unwrap();
        assert_eq!(kept.len(), 2);
        let e = select(items(), &Prefix::Explicit("nope".into())).unwrap_err();
        assert!(e.to_string().contains("fsdp_checkpoint (2)"), "{e}");
    }

    #[test]
    fn is_under_matches_whole_components() {
        assert!(p("fsdp_checkpoint/model/w").is_under(&["fsdp_checkpoint", "model"]));
        assert!(p("fsdp_checkpoint.model/w").is_under(&["fsdp_checkpoint.model"]));
        assert!(!p("fsdp_checkpoint/model").is_under(&["fsdp_checkpoint", "model"]));
        assert!(!p("fsdp_checkpoint/models/w").is_under(&["fsdp_checkpoint", "model"]));
        assert!(!p("fsdp_checkpoint.model/w").is_under(&["fsdp_checkpoint", "model"]));
        assert!(!p("a/b/c").is_under(&["a", "c"]));
    }

    #[test]
    fn skipping_many_groups_counts_each_once() {
        let mut items: Vec<_> = (0..100_000).map(|i| (p(&format!("g{i}/w")), i)).collect();
        items.push((p("g7/v"), 0));
        items.push((p("keep/w"), 0));
        let (kept, sel) = select(items, &Prefix::Explicit("keep".into())).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(sel.skipped.len(), 100_000);
        assert_eq!(sel.skipped[7], ("g7".to_string(), 2));
    }

    #[test]
    fn colliding_names_are_an_error() {
        let items = vec![(p("a.b"), 1), (p("a/b"), 2)];
        assert_eq!(select(items, &Prefix::Auto).unwrap_err().label(), "tensor");
    }
}

#[cfg(test)]
mod dcp_tests {
    use super::*;

    #[test]
    fn rlinf_prefix_wins_and_groups_are_reported_at_its_depth() {
        let p = |s: &str| TensorPath::from_parts(&s.split('/').collect::<Vec<_>>());
        let items = vec![
            (p("fsdp_checkpoint/model/model.embed_tokens.weight"), 1),
            (p("fsdp_checkpoint/optimizers/state/model.embed_tokens.weight/exp_avg"), 2),
        ];
        let (kept, sel) = select(items, &Prefix::Auto).unwrap();
        assert_eq!(kept, vec![("model.embed_tokens.weight".to_string(), 1)]);
        assert_eq!(sel.skipped, vec![("fsdp_checkpoint.optimizers".to_string(), 1)]);
    }
}
