//! The hyperparameters that decide a Megatron merge: read from the pickled `args` (or, without them, from tensor
//! shapes and the base config.json), then checked against the rank grid, the base config and the HF family.

use super::family::{Family, MoeNames};
use super::{Args, RankModel, bad};
use crate::error::{Error, ErrorKind, Result};
use crate::hf::BaseModel;

/// The hyperparameters that decide the merge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Transformer layers.
    pub num_layers: u64,
    /// Hidden size.
    pub hidden: u64,
    /// Attention heads.
    pub heads: u64,
    /// Key/value groups (GQA).
    pub groups: u64,
    /// Head dimension.
    pub kv_channels: u64,
    /// MLP hidden size.
    pub ffn: u64,
    /// Gated MLP (fc1 holds gate and up).
    pub swiglu: bool,
    /// Bias on the fused QKV.
    pub qkv_bias: bool,
    /// Layer norms on q and k (Qwen3).
    pub qk_norm: bool,
    /// Padded vocabulary rows.
    pub padded_vocab: u64,
    /// Whether embedding and output layer are tied.
    pub tied: bool,
    /// Tensor-parallel size.
    pub tp: u64,
    /// Pipeline-parallel size.
    pub pp: u64,
    /// Mixture-of-Experts layers, when the checkpoint has any.
    pub moe: Option<MoeLayout>,
    /// Multi-Latent Attention, when the checkpoint's attention is MLA.
    pub mla: Option<MlaLayout>,
}

/// The sizes of Multi-Latent Attention (0 where neither `args` nor the base config say).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MlaLayout {
    /// Rank of q's low-rank projection (0: q is projected directly).
    pub q_lora: u64,
    /// Rank of k/v's low-rank projection.
    pub kv_lora: u64,
    /// q/k head dimension without the rotary part.
    pub qk_nope: u64,
    /// The rotary part of the q/k head dimension.
    pub qk_rope: u64,
    /// v head dimension.
    pub v_head: u64,
}

/// The hyperparameters of the Mixture-of-Experts layers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoeLayout {
    /// Experts per MoE layer.
    pub experts: u64,
    /// Experts each routes a token to (0: not known).
    pub topk: u64,
    /// An expert's hidden size.
    pub ffn: u64,
    /// The shared expert's hidden size (0: none).
    pub shared_ffn: u64,
    /// Expert-parallel ranks the experts are split over in the rank files (1 for torch_dist, whose experts are
    /// numbered globally).
    pub ep: u64,
    /// Expert-parallel size the checkpoint was saved with.
    pub ep_saved: u64,
    /// Expert tensor-parallel size: TP, or 1 (each expert whole on one rank).
    pub etp: u64,
    /// Softmax over all experts before the top-k (Megatron's `moe_router_pre_softmax`), i.e. no renormalising.
    pub pre_softmax: bool,
}

/// Where the layout is read from: the ranks' tensors, their `args`, the base model, and the grid they form.
pub(super) struct LayoutSource<'a> {
    /// Every rank's model tensors.
    pub ranks: &'a [RankModel],
    /// `args`, when the checkpoint has them.
    pub args: Option<&'a Args>,
    /// The base model, when given.
    pub base: Option<&'a BaseModel<'a>>,
    /// The (TP, PP, EP) grid the checkpoint was saved from (EP 1 when the experts are global, as in torch_dist).
    pub grid: (u64, u64, u64),
    /// What messages about the checkpoint name.
    pub file: &'a str,
}

impl LayoutSource<'_> {
    fn arg(&self, k: &str) -> Option<u64> {
        self.args.and_then(|a| a.get(k))
    }
    fn flag(&self, k: &str) -> Option<bool> {
        self.args.and_then(|a| a.flag(k))
    }
    fn cfg(&self, k: &str) -> Option<u64> {
        self.base.and_then(|b| b.int(k))
    }
    /// The shape of `key` on tensor-parallel rank 0 (any stage and chunk).
    fn shape_of(&self, key: &str) -> Option<Vec<u64>> {
        self.ranks
            .iter()
            .filter(|r| r.tp == 0)
            .find_map(|r| r.chunks.iter().find_map(|m| m.get(key).map(|v| v.shape.clone())))
    }
    /// Neither `args` nor the base config give `k` (an `args` that is not an argparse Namespace gives nothing).
    fn missing(&self, k: &str) -> Error {
        let args = match self.args {
            None => "the checkpoint has no args".to_string(),
            Some(a) if a.is_empty() => {
                format!("its args ({}) hold none of the fields an argparse Namespace has", a.what)
            }
            Some(_) => format!("its args have no {k}"),
        };
        let base =
            if self.base.is_some() { "nor has the base config.json" } else { "and no base model was given (--base)" };
        bad(format!("no {k}: {args}, {base}")).in_file(self.file)
    }
    /// The base config disagrees with the checkpoint about `what`.
    fn mismatch(&self, what: &str, ckpt: u64, hf: u64) -> Error {
        let base_name = self.base.map(|b| b.folder.name()).unwrap_or("");
        Error::new(ErrorKind::Inconsistent(format!(
            "the checkpoint has {what} = {ckpt} but the base config.json says {hf}: is the base model the one this checkpoint was trained from?"
        )))
        .in_file(&format!("{base_name}/config.json"))
    }
}

/// The layout from `args` (or tensor shapes), checked against the rank grid and the base config.
pub(super) fn derive_layout(src: &LayoutSource) -> Result<Layout> {
    let layout = read_layout(src)?;
    check_grid(src, &layout)?;
    check_base(src, &layout)?;
    Ok(layout)
}

/// Whether any rank holds a router: the checkpoint has Mixture-of-Experts layers.
fn has_router(src: &LayoutSource) -> bool {
    let router = |k: &String| k.starts_with("decoder.layers.") && k.ends_with(".mlp.router.weight");
    src.ranks.iter().any(|r| r.chunks.iter().any(|m| m.keys().any(router)))
}

fn read_moe(src: &LayoutSource) -> Result<Option<MoeLayout>> {
    if !has_router(src) {
        return Ok(None);
    }
    let experts = src
        .arg("num_experts")
        .or(src.cfg("num_experts"))
        .or(src.cfg("num_local_experts"))
        .or(src.cfg("n_routed_experts"))
        .ok_or_else(|| src.missing("num_experts"))?;
    let topk = src.arg("moe_router_topk").or(src.cfg("num_experts_per_tok")).unwrap_or(0);
    let ffn = src
        .arg("moe_ffn_hidden_size")
        .or(src.arg("ffn_hidden_size"))
        .ok_or_else(|| src.missing("moe_ffn_hidden_size"))?;
    let shared_ffn = src.arg("moe_shared_expert_intermediate_size").unwrap_or(0);
    let ep_saved = src.arg("expert_model_parallel_size").unwrap_or(src.grid.2);
    let pre_softmax = src.flag("moe_router_pre_softmax").unwrap_or(false);
    let etp = src.arg("expert_tensor_parallel_size").unwrap_or(src.grid.0);
    Ok(Some(MoeLayout { experts, topk, ffn, shared_ffn, ep: src.grid.2, ep_saved, etp, pre_softmax }))
}

fn read_mla(src: &LayoutSource) -> Option<MlaLayout> {
    let has = src.shape_of("decoder.layers.0.self_attention.linear_kv_down_proj.weight").is_some();
    if !(src.flag("multi_latent_attention").unwrap_or(false) || has) {
        return None;
    }
    let get = |a: &str, c: &str| src.arg(a).or(src.cfg(c)).unwrap_or(0);
    Some(MlaLayout {
        q_lora: get("q_lora_rank", "q_lora_rank"),
        kv_lora: get("kv_lora_rank", "kv_lora_rank"),
        qk_nope: get("qk_head_dim", "qk_nope_head_dim"),
        qk_rope: get("qk_pos_emb_head_dim", "qk_rope_head_dim"),
        v_head: get("v_head_dim", "v_head_dim"),
    })
}

fn read_layout(src: &LayoutSource) -> Result<Layout> {
    let (tp, pp, _) = src.grid;
    let hidden = src.arg("hidden_size").or(src.cfg("hidden_size")).ok_or_else(|| src.missing("hidden_size"))?;
    let heads = src
        .arg("num_attention_heads")
        .or(src.cfg("num_attention_heads"))
        .ok_or_else(|| src.missing("num_attention_heads"))?;
    let groups = match (src.flag("group_query_attention"), src.arg("num_query_groups")) {
        (Some(false), _) => heads,
        (_, Some(g)) => g,
        _ => src.cfg("num_key_value_heads").unwrap_or(heads),
    };
    let kv_channels = src.arg("kv_channels").or(src.cfg("head_dim")).or(hidden.checked_div(heads)).unwrap_or(0);
    let num_layers = src.arg("num_layers").or(src.cfg("num_hidden_layers")).ok_or_else(|| src.missing("num_layers"))?;
    let ffn =
        src.arg("ffn_hidden_size").or(src.cfg("intermediate_size")).ok_or_else(|| src.missing("ffn_hidden_size"))?;
    let emb_rows = src.shape_of("embedding.word_embeddings.weight").and_then(|s| s.first().copied()).unwrap_or(0);
    let padded_vocab = src.arg("padded_vocab_size").unwrap_or(emb_rows * tp);
    let tied = match src.flag("untie_embeddings_and_output_weights") {
        Some(untie) => !untie,
        None => src.shape_of("output_layer.weight").is_none(),
    };
    let fc1_rows = || src.shape_of("decoder.layers.0.mlp.linear_fc1.weight").and_then(|s| s.first().copied());
    let swiglu = src.flag("swiglu").unwrap_or_else(|| fc1_rows() == Some(2 * ffn / tp));
    let qkv_bias = src
        .flag("add_qkv_bias")
        .unwrap_or_else(|| src.shape_of("decoder.layers.0.self_attention.linear_qkv.bias").is_some());
    let mla = read_mla(src);
    // MLA's q_layernorm normalises q's latent, not each head: it is no q/k norm.
    let qk_norm = mla.is_none() && src.shape_of("decoder.layers.0.self_attention.q_layernorm.weight").is_some();
    Ok(Layout {
        num_layers,
        hidden,
        heads,
        groups,
        kv_channels,
        ffn,
        swiglu,
        qkv_bias,
        qk_norm,
        padded_vocab,
        tied,
        tp,
        pp,
        moe: read_moe(src)?,
        mla,
    })
}

/// `args` name the grid the folder holds, and the heads, groups and MLP split evenly over it.
fn check_grid(src: &LayoutSource, l: &Layout) -> Result<()> {
    for (k, have) in [("tensor_model_parallel_size", l.tp), ("pipeline_model_parallel_size", l.pp)] {
        if let Some(want) = src.arg(k)
            && want != have
        {
            return Err(bad(format!("args say {k} = {want} but the folder holds a grid of {have}")).in_file(src.file));
        }
    }
    if let Some(m) = &l.moe {
        check_moe_grid(src, m, l.tp)?;
    }
    if l.mla.is_some() && l.tp > 1 {
        return Err(Error::new(ErrorKind::Unsupported(format!(
            "Multi-Latent Attention at TP {}: only TP 1 is supported yet (how megatron-core splits the low-rank \
             projections over TP ranks differs between its local and Transformer Engine specs)",
            l.tp
        )))
        .in_file(src.file));
    }
    let (heads, groups, ffn, tp) = (l.heads, l.groups, l.ffn, l.tp);
    // Fewer groups than TP ranks is megatron-core's TP > query groups: each group then spans tp / groups ranks.
    let groups_fit = groups > 0 && (groups % tp == 0 || tp % groups == 0);
    if heads == 0 || !groups_fit || heads % groups != 0 || heads % tp != 0 || ffn % tp != 0 || l.kv_channels == 0 {
        return Err(bad(format!("inconsistent layout: {heads} heads, {groups} query groups, ffn {ffn}, TP {tp}"))
            .in_file(src.file));
    }
    Ok(())
}

/// The experts split evenly over the expert-parallel ranks, with tensor parallelism inside them equal to TP.
fn check_moe_grid(src: &LayoutSource, m: &MoeLayout, tp: u64) -> Result<()> {
    if src.grid.2 > 1 && m.ep_saved != src.grid.2 {
        let msg =
            format!("args say expert_model_parallel_size = {} but the folder holds {} EP ranks", m.ep_saved, m.ep);
        return Err(bad(msg).in_file(src.file));
    }
    if m.etp != tp && m.etp != 1 {
        return Err(Error::new(ErrorKind::Unsupported(format!(
            "expert_tensor_parallel_size = {} under tensor_model_parallel_size = {tp}: expert TP equal to TP, or 1, \
             is supported",
            m.etp
        )))
        .in_file(src.file));
    }
    if m.experts == 0
        || m.ep == 0
        || !m.experts.is_multiple_of(m.ep)
        || !m.ffn.is_multiple_of(m.etp)
        || !m.shared_ffn.is_multiple_of(tp)
    {
        let (e, ep, f) = (m.experts, m.ep, m.ffn);
        return Err(bad(format!("inconsistent MoE layout: {e} experts over EP {ep}, expert ffn {f}, TP {tp}"))
            .in_file(src.file));
    }
    Ok(())
}

/// The base config describes the same model.
fn check_base(src: &LayoutSource, l: &Layout) -> Result<()> {
    for (what, ckpt, key) in [
        ("hidden_size", l.hidden, "hidden_size"),
        ("num_layers", l.num_layers, "num_hidden_layers"),
        ("num_attention_heads", l.heads, "num_attention_heads"),
        ("num_query_groups", l.groups, "num_key_value_heads"),
        ("ffn_hidden_size", l.ffn, "intermediate_size"),
    ] {
        if let Some(hf) = src.cfg(key)
            && hf != ckpt
        {
            return Err(src.mismatch(what, ckpt, hf));
        }
    }
    if let Some(m) = &l.mla {
        for (what, ckpt, key) in [
            ("q_lora_rank", m.q_lora, "q_lora_rank"),
            ("kv_lora_rank", m.kv_lora, "kv_lora_rank"),
            ("qk_head_dim", m.qk_nope, "qk_nope_head_dim"),
            ("qk_pos_emb_head_dim", m.qk_rope, "qk_rope_head_dim"),
            ("v_head_dim", m.v_head, "v_head_dim"),
        ] {
            if let Some(hf) = src.cfg(key)
                && hf != ckpt
            {
                return Err(src.mismatch(what, ckpt, hf));
            }
        }
        // megatron-core rotates MLA's rotary rows as HF does with rope_interleave: true.
        if src.base.and_then(|b| b.flag("rope_interleave")) == Some(false) {
            return Err(src.mismatch("rope_interleave (MLA's rotary rows as megatron-core rotates them)", 1, 0));
        }
    } else if let Some(hd) = src.cfg("head_dim")
        && hd != l.kv_channels
    {
        return Err(src.mismatch("kv_channels", l.kv_channels, hd));
    }
    if let Some(v) = src.cfg("vocab_size")
        && v > l.padded_vocab
    {
        return Err(src.mismatch("padded_vocab_size", l.padded_vocab, v));
    }
    if let Some(tie) = src.base.and_then(|b| b.flag("tie_word_embeddings"))
        && tie != l.tied
    {
        return Err(src.mismatch("tied embeddings", l.tied as u64, tie as u64));
    }
    Ok(())
}

/// The checkpoint has what the family's HF model has: a gated MLP or not, q/k norms or not, and (when the base
/// config leaves `tie_word_embeddings` to transformers' default) the same tying.
pub(super) fn check_family(src: &LayoutSource, l: &Layout, fam: &Family) -> Result<()> {
    let has = |b: bool| if b { "has" } else { "has no" };
    if l.mla.is_some() != fam.mla.is_some() {
        let (ck, hf) = if l.mla.is_some() { ("has", "has no") } else { ("has no", "has") };
        return Err(Error::new(ErrorKind::Unsupported(format!(
            "the checkpoint {ck} Multi-Latent Attention (linear_kv_down_proj), the {} model {hf}",
            fam.name
        )))
        .in_file(src.file));
    }
    if l.swiglu != fam.gated_mlp {
        return Err(Error::new(ErrorKind::Unsupported(format!(
            "the checkpoint's MLP {} gate (swiglu), the {} model's {} one",
            has(l.swiglu),
            fam.name,
            has(fam.gated_mlp)
        )))
        .in_file(src.file));
    }
    if l.qk_norm != fam.qk_norm {
        return Err(bad(format!(
            "the checkpoint {} q/k layernorms (self_attention.q_layernorm), the {} model {} q/k norms",
            has(l.qk_norm),
            fam.name,
            has(fam.qk_norm)
        ))
        .in_file(src.file));
    }
    match (&l.moe, &fam.moe) {
        (Some(m), Some(names)) => check_moe_base(src, m, names)?,
        (None, None) => {}
        (m, _) => {
            return Err(Error::new(ErrorKind::Unsupported(format!(
                "the checkpoint {} Mixture-of-Experts layers (mlp.router), the {} model {} experts",
                has(m.is_some()),
                fam.name,
                if m.is_some() { "has no" } else { "has" }
            )))
            .in_file(src.file));
        }
    }
    if let Some(b) = src.base
        && b.flag("tie_word_embeddings").is_none()
        && fam.tied_default != l.tied
    {
        return Err(src.mismatch(
            "tied embeddings (the config leaves it to its default)",
            l.tied as u64,
            fam.tied_default as u64,
        ));
    }
    Ok(())
}

/// The base config has the checkpoint's experts, top-k, expert sizes and routing.
fn check_moe_base(src: &LayoutSource, m: &MoeLayout, names: &MoeNames) -> Result<()> {
    let Some(base) = src.base else { return Ok(()) };
    for (what, ckpt, key) in [
        ("num_experts", m.experts, names.experts_key),
        ("moe_router_topk", m.topk, "num_experts_per_tok"),
        ("moe_ffn_hidden_size", m.ffn, names.expert_ffn_key),
    ] {
        if let Some(hf) = base.int(key)
            && hf != ckpt
            && ckpt != 0
        {
            return Err(src.mismatch(what, ckpt, hf));
        }
    }
    for (what, arg, key) in [
        ("moe_router_num_groups", "moe_router_num_groups", "n_group"),
        ("moe_router_group_topk", "moe_router_group_topk", "topk_group"),
    ] {
        if let (Some(ckpt), Some(hf)) = (src.arg(arg), base.int(key))
            && ckpt != hf
        {
            return Err(src.mismatch(what, ckpt, hf));
        }
    }
    if names.shared.is_some() {
        let [size, count] = names.shared_ffn_keys;
        let hf = base.int(size).unwrap_or(0) * if count.is_empty() { 1 } else { base.int(count).unwrap_or(0) };
        if hf != m.shared_ffn {
            return Err(src.mismatch("moe_shared_expert_intermediate_size", m.shared_ffn, hf));
        }
    }
    // Megatron renormalises the top-k weights unless it takes the softmax over all experts first.
    let norm = names.norm_topk.or(base.flag("norm_topk_prob"));
    if let Some(norm) = norm
        && norm == m.pre_softmax
    {
        return Err(src.mismatch(
            "moe_router_pre_softmax (a softmax over all experts, no renormalising; norm_topk_prob is its opposite)",
            m.pre_softmax as u64,
            !norm as u64,
        ));
    }
    Ok(())
}
