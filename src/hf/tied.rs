//! Tied weights written the way `save_pretrained` writes them: of a group of names that hold the same bytes,
//! transformers keeps the weight the others are tied to and drops the tied copies (its `_tied_weights_keys`).

use super::BaseModel;
use crate::error::Result;
use crate::io::Input;
use crate::plan::{BandBuffers, Plan, PlannedTensor};

/// Which config setting a tie follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tie {
    /// Output projections tied to the input embedding: only while `tie_word_embeddings` is not false.
    Output,
    /// Encoder and decoder embeddings of a shared vocabulary (T5, BART): always tied.
    Shared,
}

/// Name endings of the copies transformers drops when they alias the weight they are tied to, in the order
/// they go: when every name of a group is on this list (Whisper's `proj_out.weight` and
/// `model.decoder.embed_tokens.weight`), the one listed last stays.
const TIED_COPIES: [(&str, Tie); 8] = [
    ("lm_head.weight", Tie::Output),
    ("proj_out.weight", Tie::Output),
    ("predictions.decoder.weight", Tie::Output),
    ("predictions.decoder.bias", Tie::Output),
    ("lm_head.decoder.weight", Tie::Output),
    ("lm_head.decoder.bias", Tie::Output),
    ("encoder.embed_tokens.weight", Tie::Shared),
    ("decoder.embed_tokens.weight", Tie::Shared),
];

/// Most tied copies and candidate partners looked at (real models have a handful; each comparison may read a
/// tensor whole, so a checkpoint naming thousands of `lm_head.weight`s must not make it quadratic).
const MAX_COPIES: usize = 64;
const MAX_PARTNERS: usize = 64;

/// Where `name` is on [`TIED_COPIES`], if it is a copy the config lets transformers tie.
fn rank(name: &str, output_tied: bool) -> Option<usize> {
    TIED_COPIES.iter().position(|(end, tie)| {
        (name == *end || name.strip_suffix(end).is_some_and(|p| p.ends_with('.')))
            && (*tie == Tie::Shared || output_tied)
    })
}

/// Whether two planned tensors hold the same bytes: the same view, or equal when read band by band.
pub(super) fn same_bytes(a: &PlannedTensor, b: &PlannedTensor, inputs: &[Input]) -> Result<bool> {
    if a.shape != b.shape || a.dtype != b.dtype {
        return Ok(false);
    }
    if a.source == b.source {
        return Ok(true);
    }
    let mut bufs = BandBuffers::default();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    // Same shapes give the same band unit (a row) or unit 1, so the smaller step suits both.
    let step = a.band_elems().min(b.band_elems());
    let esz = a.dtype.size() as u64;
    let mut start = 0;
    while start < a.numel() {
        let n = step.min(a.numel() - start);
        x.resize((n * esz) as usize, 0);
        y.resize((n * esz) as usize, 0);
        a.read_band(inputs, start, n, &mut x, &mut bufs)?;
        b.read_band(inputs, start, n, &mut y, &mut bufs)?;
        if x != y {
            return Ok(false);
        }
        start += n;
    }
    Ok(true)
}

/// Drops the tied copies (`lm_head.weight`, `proj_out.weight`, `cls.predictions.decoder.*`,
/// `encoder/decoder.embed_tokens.weight`, ...) that hold the same bytes as a weight they are tied to, keeping the
/// name `save_pretrained` keeps. Output projections are tied unless the base config says
/// `tie_word_embeddings: false` (transformers leaves the key out when it is true, its default). Returns a note.
pub fn drop_tied(plan: &mut Plan, base: &BaseModel, inputs: &[Input]) -> Result<Option<String>> {
    let setting = base.flag("tie_word_embeddings");
    let output_tied = setting != Some(false);
    let mut copies: Vec<(usize, usize)> =
        plan.tensors.iter().enumerate().filter_map(|(i, t)| Some((rank(&t.name, output_tied)?, i))).collect();
    if copies.is_empty() {
        return Ok(None);
    }
    if copies.len() > MAX_COPIES {
        return Ok(Some(format!("{} names look like tied copies: too many to compare, all kept", copies.len())));
    }
    copies.sort();
    let mut drop = vec![false; plan.tensors.len()];
    let mut dropped = Vec::new();
    let mut kept_apart = Vec::new();
    for &(r, i) in &copies {
        let t = &plan.tensors[i];
        // A partner: a weight of the same shape and dtype that stays, i.e. not a copy dropped before this one
        // and not a copy that goes before it in the list.
        let mut partner = None;
        let mut candidates: Vec<(Option<usize>, usize)> = plan
            .tensors
            .iter()
            .enumerate()
            .filter(|(j, c)| *j != i && !drop[*j] && c.shape == t.shape && c.dtype == t.dtype)
            .map(|(j, c)| (rank(&c.name, output_tied), j))
            .filter(|(q, _)| q.is_none_or(|q| q > r))
            .take(MAX_PARTNERS)
            .collect();
        // The weight itself before other copies tied to it.
        candidates.sort_by_key(|(q, j)| (q.is_some(), *j));
        for (_, j) in candidates {
            let c = &plan.tensors[j];
            if same_bytes(t, c, inputs)? {
                partner = Some(j);
                break;
            }
        }
        match partner {
            Some(j) => {
                drop[i] = true;
                dropped.push(format!("{} (tied to {})", t.name, plan.tensors[j].name));
            }
            None if setting == Some(true) && r == 0 => kept_apart.push(t.name.clone()),
            None => {}
        }
    }
    let mut i = 0;
    plan.tensors.retain(|_| {
        i += 1;
        !drop[i - 1]
    });
    let mut notes = Vec::new();
    if !dropped.is_empty() {
        notes.push(format!("dropped {}, as save_pretrained does", crate::error::some_names(&dropped, 8)));
    }
    if !kept_apart.is_empty() {
        notes.push(format!(
            "kept {}: the base config ties it, but it differs from every weight of its shape",
            kept_apart.join(", ")
        ));
    }
    Ok((!notes.is_empty()).then(|| notes.join("; ")))
}
