//! The Hugging Face families a Megatron GPT model converts to, as data. Megatron's side is the same for every
//! family (megatron-core's GPT keys); one [`Family`] entry says what the HF side calls each tensor (experts,
//! router and shared expert included), which projections it fuses, and which optional tensors (q/k/v bias, q/k
//! norms) it must or must not have. The
//! merge (`merge.rs`) reads only this table, so a dense family that differs in names or flags is one entry.

use crate::error::{Error, ErrorKind, Result};
use crate::hf::BaseModel;

/// Whether a family's attention has q/k/v biases (Megatron's `add_qkv_bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvBias {
    /// Always (Qwen2).
    Always,
    /// Never (Phi-3's `qkv_proj` has none).
    Never,
    /// As the base config's `attention_bias` says, absent meaning none (transformers' Llama and Qwen3).
    FromConfig,
}

/// The HF names of one family's tensors. Layer tensors are relative to `layers.N.`; the q/k/v and gate/up
/// lists name either each projection or, with one name, a single tensor stacking them on dim 0 in that order.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    /// Token embedding.
    pub embed: &'static str,
    /// The norm after the last layer.
    pub final_norm: &'static str,
    /// Output projection (absent with tied embeddings).
    pub lm_head: &'static str,
    /// Prefix of the layers, before the layer number.
    pub layers: &'static str,
    /// q, k and v projections (`.weight`/`.bias` appended), or one fused `[q; k; v]`.
    pub qkv: &'static [&'static str],
    /// Attention output projection.
    pub o_proj: &'static str,
    /// q and k norms, for families with `qk_norm`.
    pub qk_norm: [&'static str; 2],
    /// Gate and up projections, or one fused `[gate; up]`; for an ungated MLP, its one input projection.
    pub gate_up: &'static [&'static str],
    /// MLP output projection.
    pub down: &'static str,
    /// The norm before attention.
    pub input_norm: &'static str,
    /// The norm before the MLP.
    pub post_attn_norm: &'static str,
}

/// The HF names of a Mixture-of-Experts layer's tensors, relative to `layers.N.`.
#[derive(Debug, Clone, Copy)]
pub struct MoeNames {
    /// The router (Megatron's `mlp.router.weight`, `[experts, hidden]`).
    pub router: &'static str,
    /// The router's score-correction bias (Megatron's `mlp.router.expert_bias`), for families that have one.
    pub router_bias: Option<&'static str>,
    /// Prefix of the experts, before the expert number.
    pub experts: &'static str,
    /// An expert's gate, up and down projections, after `experts.E.`.
    pub expert: [&'static str; 3],
    /// The shared expert's gate, up and down projections, for families that have one.
    pub shared: Option<[&'static str; 3]>,
    /// The shared expert's sigmoid gate (Megatron's `mlp.shared_experts.gate_weight`, `[1, hidden]`).
    pub shared_gate: Option<&'static str>,
    /// The base config.json key holding an expert's hidden size.
    pub expert_ffn_key: &'static str,
    /// The base config.json keys whose product is the shared expert's hidden size (a count key may be absent).
    pub shared_ffn_keys: [&'static str; 2],
    /// The base config.json key holding the number of experts.
    pub experts_key: &'static str,
    /// Whether the HF model renormalises the top-k routing weights: fixed (Mixtral), or as the base config's
    /// `norm_topk_prob` says (Qwen2/3-MoE).
    pub norm_topk: Option<bool>,
}

/// The HF names of Multi-Latent Attention's tensors (DeepSeek-V2/V3), relative to `layers.N.`: megatron-core's
/// MLA projections map one to one, rows in the same order (HF's `rope_interleave: true` applies the rotary
/// embedding to the rows as megatron-core does; see tests/fixtures/make_megatron_mla_fixtures.py).
#[derive(Debug, Clone, Copy)]
pub struct MlaNames {
    /// (Megatron key after `self_attention.`, HF name) of every projection and norm; norms may also appear
    /// under Transformer Engine's fused names.
    pub map: &'static [(&'static str, &'static str)],
}

/// One HF family: how megatron-core's GPT model is named and shaped in it.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// Shown in messages and `inspect`.
    pub name: &'static str,
    /// The base config.json `model_type` values that select it.
    pub model_types: &'static [&'static str],
    /// Whether q/k/v have biases.
    pub qkv_bias: QkvBias,
    /// Whether attention has q/k norms (Megatron's `qk_layernorm`).
    pub qk_norm: bool,
    /// Whether the MLP is gated (Megatron's `swiglu`: fc1 holds gate and up).
    pub gated_mlp: bool,
    /// transformers' `tie_word_embeddings` when config.json leaves it out.
    pub tied_default: bool,
    /// The HF tensor names.
    pub names: Names,
    /// The names of its Mixture-of-Experts layers (`None`: a dense family).
    pub moe: Option<MoeNames>,
    /// Its Multi-Latent Attention names (`None`: grouped-query attention from a fused QKV).
    pub mla: Option<MlaNames>,
}

/// Llama's names, which Qwen2, Qwen3 and Mistral share.
const LLAMA_NAMES: Names = Names {
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layers: "model.layers",
    qkv: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    o_proj: "self_attn.o_proj.weight",
    qk_norm: ["self_attn.q_norm.weight", "self_attn.k_norm.weight"],
    gate_up: &["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    down: "mlp.down_proj.weight",
    input_norm: "input_layernorm.weight",
    post_attn_norm: "post_attention_layernorm.weight",
};

/// Qwen2-MoE's and Qwen3-MoE's expert names.
const QWEN_MOE: MoeNames = MoeNames {
    router: "mlp.gate.weight",
    router_bias: None,
    experts: "mlp.experts",
    expert: ["gate_proj.weight", "up_proj.weight", "down_proj.weight"],
    shared: None,
    shared_gate: None,
    expert_ffn_key: "moe_intermediate_size",
    shared_ffn_keys: ["shared_expert_intermediate_size", ""],
    experts_key: "num_experts",
    norm_topk: None,
};

/// Every supported family. Without a base model the first entry whose flags fit the checkpoint is used, so the
/// order matters there: Qwen2 (a bias), Qwen3 (q/k norms), then Llama.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "Qwen2",
        model_types: &["qwen2"],
        qkv_bias: QkvBias::Always,
        qk_norm: false,
        gated_mlp: true,
        tied_default: false,
        names: LLAMA_NAMES,
        moe: None,
        mla: None,
    },
    Family {
        name: "Qwen3",
        model_types: &["qwen3"],
        qkv_bias: QkvBias::FromConfig,
        qk_norm: true,
        gated_mlp: true,
        tied_default: false,
        names: LLAMA_NAMES,
        moe: None,
        mla: None,
    },
    Family {
        name: "Llama",
        model_types: &["llama", "mistral"],
        qkv_bias: QkvBias::FromConfig,
        qk_norm: false,
        gated_mlp: true,
        tied_default: false,
        names: LLAMA_NAMES,
        moe: None,
        mla: None,
    },
    Family {
        name: "Phi3",
        model_types: &["phi3"],
        qkv_bias: QkvBias::Never,
        qk_norm: false,
        gated_mlp: true,
        tied_default: false,
        names: Names { qkv: &["self_attn.qkv_proj"], gate_up: &["mlp.gate_up_proj.weight"], ..LLAMA_NAMES },
        moe: None,
        mla: None,
    },
    Family {
        name: "Qwen3-MoE",
        model_types: &["qwen3_moe"],
        qkv_bias: QkvBias::FromConfig,
        qk_norm: true,
        gated_mlp: true,
        tied_default: false,
        names: LLAMA_NAMES,
        moe: Some(QWEN_MOE),
        mla: None,
    },
    Family {
        name: "Qwen2-MoE",
        model_types: &["qwen2_moe"],
        qkv_bias: QkvBias::Always,
        qk_norm: false,
        gated_mlp: true,
        tied_default: false,
        names: LLAMA_NAMES,
        moe: Some(MoeNames {
            shared: Some([
                "mlp.shared_expert.gate_proj.weight",
                "mlp.shared_expert.up_proj.weight",
                "mlp.shared_expert.down_proj.weight",
            ]),
            shared_gate: Some("mlp.shared_expert_gate.weight"),
            ..QWEN_MOE
        }),
        mla: None,
    },
    Family {
        name: "Mixtral",
        model_types: &["mixtral"],
        qkv_bias: QkvBias::Never,
        qk_norm: false,
        gated_mlp: true,
        tied_default: false,
        names: LLAMA_NAMES,
        moe: Some(MoeNames {
            router: "block_sparse_moe.gate.weight",
            experts: "block_sparse_moe.experts",
            expert: ["w1.weight", "w3.weight", "w2.weight"],
            expert_ffn_key: "intermediate_size",
            experts_key: "num_local_experts",
            norm_topk: Some(true),
            ..QWEN_MOE
        }),
        mla: None,
    },
    Family {
        name: "DeepSeek-V3",
        model_types: &["deepseek_v3"],
        qkv_bias: QkvBias::Never,
        qk_norm: false,
        gated_mlp: true,
        tied_default: false,
        names: LLAMA_NAMES,
        moe: Some(MoeNames {
            router_bias: Some("mlp.gate.e_score_correction_bias"),
            shared: Some([
                "mlp.shared_experts.gate_proj.weight",
                "mlp.shared_experts.up_proj.weight",
                "mlp.shared_experts.down_proj.weight",
            ]),
            shared_ffn_keys: ["moe_intermediate_size", "n_shared_experts"],
            experts_key: "n_routed_experts",
            ..QWEN_MOE
        }),
        mla: Some(MlaNames {
            map: &[
                ("linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
                ("q_layernorm.weight", "self_attn.q_a_layernorm.weight"),
                ("linear_q_up_proj.layer_norm_weight", "self_attn.q_a_layernorm.weight"),
                ("linear_q_up_proj.weight", "self_attn.q_b_proj.weight"),
                ("linear_q_proj.weight", "self_attn.q_proj.weight"),
                ("linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
                ("kv_layernorm.weight", "self_attn.kv_a_layernorm.weight"),
                ("linear_kv_up_proj.layer_norm_weight", "self_attn.kv_a_layernorm.weight"),
                ("linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"),
            ],
        }),
    },
];

/// The family the base config's `model_type` names.
pub fn by_model_type(base: &BaseModel) -> Result<&'static Family> {
    let mt = base.text("model_type").unwrap_or("");
    FAMILIES.iter().find(|f| f.model_types.contains(&mt)).ok_or_else(|| {
        let known: Vec<&str> = FAMILIES.iter().flat_map(|f| f.model_types.iter().copied()).collect();
        Error::new(ErrorKind::Unsupported(format!(
            "base model_type '{mt}': Megatron conversion supports {} (qwen2 includes DeepSeek-R1-Distill-Qwen)",
            known.join(", ")
        )))
        .in_file(base.folder.name())
    })
}

/// Without a base model (inspect only): the first family whose flags fit what the checkpoint holds.
pub fn by_flags(qkv_bias: bool, qk_norm: bool, moe: bool, mla: bool) -> &'static Family {
    let fits = |f: &&Family| {
        f.qk_norm == qk_norm
            && f.moe.is_some() == moe
            && f.mla.is_some() == mla
            && f.qkv_bias != if qkv_bias { QkvBias::Never } else { QkvBias::Always }
    };
    FAMILIES.iter().find(fits).unwrap_or(&FAMILIES[0])
}

impl Family {
    /// Whether the q/k/v biases must be present (`Some(true)`) or absent (`Some(false)`), and why; `None` when
    /// nothing says (a config-dependent family without a base model).
    pub fn bias_rule(&self, base: Option<&BaseModel>) -> Option<(bool, String)> {
        match self.qkv_bias {
            QkvBias::Always => Some((true, format!("{} attention has q/k/v biases", self.name))),
            QkvBias::Never => Some((false, format!("{} attention has no q/k/v biases", self.name))),
            QkvBias::FromConfig => base.map(|b| {
                let on = b.flag("attention_bias") == Some(true);
                let says = if on { "says attention_bias: true" } else { "has no attention_bias: true" };
                (on, format!("the base {} config {says}", self.name))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_names_its_pieces_whole_or_fused() {
        for f in FAMILIES {
            assert!(matches!(f.names.qkv.len(), 1 | 3), "{}: q/k/v names", f.name);
            let gate_up = if f.gated_mlp { [1, 2] } else { [1, 1] };
            assert!(gate_up.contains(&f.names.gate_up.len()), "{}: gate/up names", f.name);
        }
    }

    #[test]
    fn without_a_base_the_flags_choose() {
        assert_eq!(by_flags(true, false, false, false).name, "Qwen2");
        assert_eq!(by_flags(false, true, false, false).name, "Qwen3");
        assert_eq!(by_flags(true, true, false, false).name, "Qwen3");
        assert_eq!(by_flags(false, false, false, false).name, "Llama");
        assert_eq!(by_flags(false, true, true, false).name, "Qwen3-MoE");
        assert_eq!(by_flags(true, false, true, false).name, "Qwen2-MoE");
        assert_eq!(by_flags(false, false, true, false).name, "Mixtral");
        assert_eq!(by_flags(false, false, true, true).name, "DeepSeek-V3");
    }
}
