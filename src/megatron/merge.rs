//! The one Megatron merge: megatron-core GPT tensors of every rank become the HF tensors one [`Family`] entry
//! names. Every output is a view over the rank files: column-parallel tensors stack on dim 0, row-parallel ones
//! on dim 1, the fused QKV splits per query group into q/k/v, SwiGLU's fc1 splits per rank into gate/up (a
//! family that fuses them stacks the pieces again, still as views), the padded vocabulary is trimmed, and
//! replicated tensors must match across tensor-parallel ranks. Nothing here depends on which family it is.

use super::family::{self, Family, MlaNames};
use super::layout::{Layout, LayoutSource, MoeLayout, check_family, derive_layout};
use super::{Args, FC1_GATE, FC1_UP, RankModel, bad};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result, tensor_err};
use crate::hf::BaseModel;
use crate::io::{Folder, Input};
use crate::plan::{Chunk, ChunkedTensor, Plan, PlannedTensor, Source, StridedView, check_tiling};
use crate::planned::{GroupCounter, InputKind, PlanOptions, Planned, group_of, selection_notes};
use crate::select::{self, Selection, TensorPath};
use std::collections::{HashMap, HashSet};

/// A checkpoint's model tensors, rank by rank, as the readers (rank files, torch_dist) hand them over.
pub(super) struct Checkpoint {
    /// The files the views read.
    pub inputs: Vec<Input>,
    /// Every rank's model tensors.
    pub ranks: Vec<RankModel>,
    /// `args`, agreed by every rank.
    pub args: Option<Args>,
    /// The file `args` were read from (rank 0's, or torch_dist's common.pt): what messages about them name.
    pub args_file: String,
    /// The (TP, PP, EP) grid of `ranks` (EP 1 when the experts are numbered globally, as in torch_dist).
    pub grid: (u64, u64, u64),
    /// How many pipeline stages `ranks` are split into: the grid's PP for rank files, 1 when the layers are
    /// already numbered globally (torch_dist).
    pub stages: u64,
    /// What the plan calls the input.
    pub format: String,
}

/// Where one global layer's tensors are.
#[derive(Debug, Clone, Copy)]
struct LayerHome {
    stage: u64,
    chunk: usize,
    local: u64,
}

impl LayerHome {
    fn key(&self, suffix: &str) -> String {
        format!("decoder.layers.{}.{suffix}", self.local)
    }
}

/// One output tensor under construction.
struct Out {
    name: String,
    shape: Vec<u64>,
    dtype: DType,
    chunks: Vec<Chunk>,
}

/// The merge in progress: what it reads, the family it writes, and what it has produced and consumed.
struct Merge<'a> {
    inputs: &'a [Input],
    ranks: &'a [RankModel],
    /// Index into `ranks` by (stage, tensor-parallel rank, expert-parallel rank), built once so every key costs a
    /// hash lookup.
    at: HashMap<(u64, u64, u64), usize>,
    /// The rank that holds each (stage, tensor-parallel rank)'s dense tensors: its lowest expert-parallel rank
    /// (the others hold data-parallel copies).
    dense_home: HashMap<(u64, u64), usize>,
    /// With expert TP 1 (under any TP), the rank that holds each (stage, expert-parallel rank)'s whole experts: its
    /// lowest tensor-parallel rank.
    expert_home: HashMap<(u64, u64), usize>,
    tp: u64,
    /// Expert tensor-parallel size: TP, or 1.
    etp: u64,
    stages: u64,
    chunks_per_stage: usize,
    layout: &'a Layout,
    fam: &'static Family,
    /// Whether q/k/v biases must be present or absent, and why (`None`: either).
    bias_rule: Option<(bool, String)>,
    /// (rank index, chunk, key) of every Megatron tensor given a place.
    used: HashSet<(usize, usize, String)>,
    outs: Vec<Out>,
    /// Tensors replicated across tensor-parallel ranks, checked equal at the end.
    replicated: Vec<(String, Vec<StridedView>)>,
    /// Whether each layer, in order, is a Mixture-of-Experts layer.
    moe_layers: Vec<bool>,
}

/// Plans the HF model of `base` from the model tensors of every rank.
pub(super) fn plan_ranks(
    folder: &dyn Folder,
    ck: Checkpoint,
    base: Option<&BaseModel>,
    opts: &PlanOptions,
) -> Result<(Planned, String)> {
    let src = LayoutSource { ranks: &ck.ranks, args: ck.args.as_ref(), base, grid: ck.grid, file: &ck.args_file };
    let layout = derive_layout(&src)?;
    // Without a base model (inspect only) the family is guessed from the layout and nothing is trimmed.
    let fam = match base {
        Some(b) => family::by_model_type(b)?,
        None => family::by_flags(layout.qkv_bias, layout.qk_norm, layout.moe.is_some(), layout.mla.is_some()),
    };
    check_family(&src, &layout, fam)?;
    let vocab = base.and_then(|b| b.int("vocab_size")).unwrap_or(layout.padded_vocab);
    let mut m = Merge::new(&ck, &layout, fam, base);
    let homes = m.layer_homes(folder)?;
    m.embedding(folder, vocab)?;
    for (g, home) in homes.iter().enumerate() {
        m.attention(g, *home)?;
        m.mlp(g, *home)?;
        m.norms(g, *home)?;
    }
    m.tail(folder, vocab)?;
    m.check_all_placed()?;
    check_dense_layers(&m.moe_layers, base, &ck.args_file)?;
    for (name, p) in &m.replicated {
        check_replicated(m.inputs, name, p)?;
    }
    let notes = vec![m.note(vocab)];
    let outs = std::mem::take(&mut m.outs);
    let target =
        opts.dtype.or(base.and_then(|b| b.text("torch_dtype").or(b.text("dtype"))).and_then(DType::from_torch_name));
    let (plan, groups) = into_plan(outs, opts, target, notes)?;
    let args_text = match &ck.args {
        Some(a) => format!("args: {}", a.summary()),
        None => "args: none in the checkpoint; layout inferred from tensor shapes and config.json".into(),
    };
    let planned = Planned { kind: InputKind::Megatron, plan, format: ck.format, inputs: ck.inputs, groups };
    Ok((planned.checked(folder.name())?, args_text))
}

/// The planned tensors (after `--prefix` selection, cast to `target`) and their group counts.
fn into_plan(
    outs: Vec<Out>,
    opts: &PlanOptions,
    target: Option<DType>,
    mut notes: Vec<String>,
) -> Result<(Plan, Vec<crate::planned::Group>)> {
    let mut groups = GroupCounter::default();
    let mut items = Vec::new();
    for o in outs {
        let (name, t) = finish(o)?;
        let path = TensorPath::from_parts(&[name.as_str()]);
        groups.add(group_of(&path), Some(t.nbytes()));
        items.push((path, t));
    }
    let (kept, sel): (Vec<(String, ChunkedTensor)>, Selection) = select::select(items, &opts.prefix)?;
    let tensors = kept
        .into_iter()
        .map(|(name, t)| {
            let shape = t.shape().to_vec();
            PlannedTensor::from_source(name, shape, Source::Chunked(t), target)
        })
        .collect();
    let mut all = selection_notes(&sel);
    all.append(&mut notes);
    Ok((Plan { tensors, notes: all }, groups.into_groups()))
}

impl<'a> Merge<'a> {
    fn new(ck: &'a Checkpoint, layout: &'a Layout, fam: &'static Family, base: Option<&BaseModel>) -> Merge<'a> {
        Merge {
            inputs: &ck.inputs,
            ranks: &ck.ranks,
            at: ck.ranks.iter().enumerate().map(|(i, r)| ((r.pp, r.tp, r.ep), i)).collect(),
            dense_home: lowest(ck.ranks.iter().enumerate().map(|(i, r)| ((r.pp, r.tp), r.ep, i))),
            expert_home: lowest(ck.ranks.iter().enumerate().map(|(i, r)| ((r.pp, r.ep), r.tp, i))),
            tp: ck.grid.0,
            etp: layout.moe.as_ref().map_or(ck.grid.0, |m| m.etp),
            stages: ck.stages,
            chunks_per_stage: ck.ranks.iter().map(|r| r.chunks.len()).max().unwrap_or(1),
            layout,
            fam,
            bias_rule: fam.bias_rule(base),
            used: HashSet::new(),
            outs: Vec::new(),
            replicated: Vec::new(),
            moe_layers: Vec::new(),
        }
    }

    /// Every tensor-parallel rank's `key` in one chunk of one stage, marked used; `None` if a rank lacks it. Dense
    /// tensors are read from each tensor-parallel rank's lowest expert-parallel rank (the other EP ranks hold
    /// data-parallel copies of them).
    fn parts(&mut self, stage: u64, chunk: usize, key: &str) -> Option<Vec<StridedView>> {
        self.parts_of(stage, None, chunk, key)
    }

    /// The ranks holding one stage's dense tensors (`who` `None`) or expert-parallel rank `who`'s experts, in
    /// expert-tensor-parallel order.
    fn holders(&self, stage: u64, who: Option<u64>) -> Option<Vec<usize>> {
        match who {
            None => (0..self.tp).map(|t| self.dense_home.get(&(stage, t)).copied()).collect(),
            Some(ep) if self.etp == self.tp => (0..self.tp).map(|t| self.at.get(&(stage, t, ep)).copied()).collect(),
            Some(ep) => self.expert_home.get(&(stage, ep)).map(|&i| vec![i]),
        }
    }

    /// The first of [`Merge::holders`]: tensor-parallel rank 0's (or expert-TP rank 0's) rank.
    fn first_holder(&self, stage: u64, who: Option<u64>) -> Option<&RankModel> {
        let first = match who {
            None => self.dense_home.get(&(stage, 0)).copied(),
            Some(_) => self.holders(stage, who)?.first().copied(),
        };
        first.and_then(|i| self.ranks.get(i))
    }

    /// [`Merge::parts`] of the dense tensors (`who` `None`) or of expert-parallel rank `who`'s experts.
    fn parts_of(&mut self, stage: u64, who: Option<u64>, chunk: usize, key: &str) -> Option<Vec<StridedView>> {
        let holders = self.holders(stage, who)?;
        let mut out = Vec::with_capacity(holders.len());
        for &i in &holders {
            out.push(self.ranks.get(i)?.chunks.get(chunk)?.get(key)?.clone());
        }
        for i in holders {
            self.used.insert((i, chunk, key.to_string()));
        }
        Some(out)
    }

    fn need(&mut self, stage: u64, chunk: usize, key: &str) -> Result<Vec<StridedView>> {
        self.parts(stage, chunk, key).ok_or_else(|| bad(format!("tensor '{key}' is missing on some rank")))
    }

    /// A row-parallel weight: every TP rank's part concatenated along dim 1, as output `name`.
    fn push_row_parallel(&mut self, name: String, parts: &[StridedView]) -> Result<()> {
        let (shape, chunks) = concat(self.inputs, &name, parts, 1)?;
        let dtype = parts.first().map(|p| p.dtype).ok_or_else(|| bad(format!("no rank holds '{name}'")))?;
        self.outs.push(Out { name, shape, dtype, chunks });
        Ok(())
    }

    /// A layer tensor, which every rank of its stage must hold.
    fn layer_part(&mut self, h: LayerHome, suffix: &str) -> Result<Vec<StridedView>> {
        self.need(h.stage, h.chunk, &h.key(suffix))
    }

    /// The first (stage, chunk) whose tensor-parallel rank 0 holds `key`.
    fn find_stage(&self, key: &str) -> Option<(u64, usize)> {
        (0..self.stages).flat_map(|s| (0..self.chunks_per_stage).map(move |v| (s, v))).find(|&(s, v)| {
            self.first_holder(s, None).is_some_and(|r| r.chunks.get(v).is_some_and(|m| m.contains_key(key)))
        })
    }

    /// The name of a layer tensor in the family's HF model.
    fn hf(&self, g: usize, suffix: &str) -> String {
        format!("{}.{g}.{suffix}", self.fam.names.layers)
    }

    /// A tensor replicated across tensor-parallel ranks: rank 0's copy, the others checked equal to it later.
    fn replicated(&mut self, key: String, parts: Vec<StridedView>, name: String) {
        let p0 = &parts[0];
        self.outs.push(Out { name, shape: p0.shape.clone(), dtype: p0.dtype, chunks: vec![whole(p0)] });
        self.replicated.push((key, parts));
    }

    /// Global layer order: virtual chunk, then stage, then local index.
    fn layer_homes(&self, folder: &dyn Folder) -> Result<Vec<LayerHome>> {
        let mut homes = Vec::new();
        for chunk in 0..self.chunks_per_stage {
            for stage in 0..self.stages {
                let r0 = self.first_holder(stage, None).ok_or_else(|| bad("rank grid hole"))?;
                let Some(map) = r0.chunks.get(chunk) else { continue };
                let mut locals: Vec<u64> = map
                    .keys()
                    .filter_map(|k| k.strip_prefix("decoder.layers.")?.split('.').next()?.parse().ok())
                    .collect();
                locals.sort_unstable();
                locals.dedup();
                for (i, &local) in locals.iter().enumerate() {
                    if local != i as u64 {
                        let msg = format!("stage {stage} holds layers {locals:?}: local layer numbers must run from 0");
                        return Err(bad(msg).in_file(&self.inputs[r0.input].name));
                    }
                    homes.push(LayerHome { stage, chunk, local });
                }
            }
        }
        if homes.len() as u64 != self.layout.num_layers {
            let (n, want) = (homes.len(), self.layout.num_layers);
            return Err(bad(format!("the checkpoint holds {n} layers but num_layers is {want}")).in_file(folder.name()));
        }
        Ok(homes)
    }

    /// The embedding (column-parallel on the vocabulary), trimmed to the HF vocabulary.
    fn embedding(&mut self, folder: &dyn Folder, vocab: u64) -> Result<()> {
        let key = "embedding.word_embeddings.weight";
        let (s, v) =
            self.find_stage(key).ok_or_else(|| bad(format!("no {key} on any stage")).in_file(folder.name()))?;
        let emb = self.need(s, v, key)?;
        self.outs.push(vocab_out(self.inputs, self.fam.names.embed, &emb, vocab)?);
        Ok(())
    }

    /// q/k/v (and their biases) from the fused QKV, the q/k norms, and the output projection.
    fn attention(&mut self, g: usize, h: LayerHome) -> Result<()> {
        if let Some(mla) = self.fam.mla {
            return self.mla_attention(g, h, mla);
        }
        let names = self.fam.names;
        let qkv = self.layer_part(h, "self_attention.linear_qkv.weight")?;
        let prefix = self.hf(g, "self_attn");
        self.place(split_qkv(self.inputs, &prefix, "weight", &qkv, self.layout)?, g, names.qkv, ".weight")?;
        let key = h.key("self_attention.linear_qkv.bias");
        match (self.parts(h.stage, h.chunk, &key), &self.bias_rule) {
            (Some(_), Some((false, why))) => return Err(bad(format!("{key} is present, but {why}"))),
            (None, Some((true, why))) => return Err(bad(format!("{key} is missing, but {why}"))),
            (Some(b), _) => {
                self.place(split_qkv(self.inputs, &prefix, "bias", &b, self.layout)?, g, names.qkv, ".bias")?
            }
            (None, _) => {}
        }
        if self.fam.qk_norm {
            for (mg, name) in
                ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"].iter().zip(names.qk_norm)
            {
                let p = self.layer_part(h, mg)?;
                self.replicated(h.key(mg), p, self.hf(g, name));
            }
        }
        let proj = self.layer_part(h, "self_attention.linear_proj.weight")?;
        self.push_row_parallel(self.hf(g, names.o_proj), &proj)
    }

    /// Multi-Latent Attention's projections and norms, each to its one HF name (TP 1: see `check_grid`), and the
    /// output projection.
    fn mla_attention(&mut self, g: usize, h: LayerHome, mla: MlaNames) -> Result<()> {
        let mut placed: Vec<&str> = Vec::new();
        for &(mg, hf) in mla.map {
            let key = h.key(&format!("self_attention.{mg}"));
            let Some(p) = self.parts(h.stage, h.chunk, &key) else { continue };
            if placed.contains(&hf) {
                return Err(bad(format!("layer {} holds two tensors for {hf} ({key} is one)", h.local)));
            }
            placed.push(hf);
            self.replicated(key, p, self.hf(g, hf));
        }
        let q = ["self_attn.q_a_proj.weight", "self_attn.q_proj.weight"];
        for (need, what) in [
            (&q[..], "linear_q_down_proj.weight or linear_q_proj.weight"),
            (&["self_attn.kv_a_proj_with_mqa.weight"], "linear_kv_down_proj.weight"),
            (&["self_attn.kv_a_layernorm.weight"], "kv_layernorm.weight"),
            (&["self_attn.kv_b_proj.weight"], "linear_kv_up_proj.weight"),
        ] {
            if !need.iter().any(|n| placed.contains(n)) {
                let key = h.key(&format!("self_attention.{what}"));
                return Err(bad(format!("tensor '{key}' is missing: Multi-Latent Attention needs it")));
            }
        }
        let proj = self.layer_part(h, "self_attention.linear_proj.weight")?;
        self.push_row_parallel(self.hf(g, self.fam.names.o_proj), &proj)
    }

    /// fc1 as gate and up (or, ungated, as itself), and fc2 as the down projection; or, in a layer with a
    /// router, the Mixture-of-Experts block.
    fn mlp(&mut self, g: usize, h: LayerHome) -> Result<()> {
        let moe = self.layout.moe.is_some() && self.layer_has(h, None, "mlp.router.weight");
        self.moe_layers.push(moe);
        if moe {
            return self.moe(g, h);
        }
        let names = self.fam.names;
        let pieces = self.fc1(g, h, None, "mlp")?;
        self.place(pieces, g, names.gate_up, "")?;
        let fc2 = self.layer_part(h, "mlp.linear_fc2.weight")?;
        self.push_row_parallel(self.hf(g, names.down), &fc2)
    }

    /// The fc1 of the MLP at `module` (`mlp`, `mlp.shared_experts`, `mlp.experts.local_experts.J`) on
    /// expert-parallel rank `ep`, as gate and up (or, ungated, as itself), unnamed.
    fn fc1(&mut self, g: usize, h: LayerHome, who: Option<u64>, module: &str) -> Result<Vec<Out>> {
        self.fc1_key(g, h, who, &format!("{module}.linear_fc1.weight"))
    }

    /// [`Merge::fc1`] of the weight `suffix` (or, when it ends in `linear_fc1.weight`, of its torch_dist halves).
    fn fc1_key(&mut self, g: usize, h: LayerHome, who: Option<u64>, suffix: &str) -> Result<Vec<Out>> {
        let fc1_name = self.hf(g, suffix);
        let module = suffix.strip_suffix(".linear_fc1.weight").unwrap_or(suffix);
        let key = h.key(suffix);
        // Rank files hold each rank's [gate_r; up_r]; torch_dist stores the halves apart (see load_dist).
        Ok(match self.parts_of(h.stage, who, h.chunk, &key) {
            Some(fc1) if self.layout.swiglu => gate_up(fc1_halves(self.inputs, &fc1_name, &fc1)?),
            Some(fc1) => {
                let (shape, chunks) = concat(self.inputs, &fc1_name, &fc1, 0)?;
                vec![Out { name: fc1_name, shape, dtype: fc1[0].dtype, chunks }]
            }
            None => {
                let gate = self.parts_of(h.stage, who, h.chunk, &h.key(&format!("{module}.{FC1_GATE}")));
                let up = self.parts_of(h.stage, who, h.chunk, &h.key(&format!("{module}.{FC1_UP}")));
                let (Some(gate), Some(up)) = (gate, up) else {
                    return Err(self.missing(&key, who));
                };
                gate_up((gate, up))
            }
        })
    }

    /// A tensor that some rank (of expert-parallel rank `who`, for an expert's) lacks.
    fn missing(&self, key: &str, who: Option<u64>) -> Error {
        match (self.layout.moe.as_ref().map_or(1, |m| m.ep), who) {
            (1, _) | (_, None) => bad(format!("tensor '{key}' is missing on some rank")),
            (_, Some(ep)) => bad(format!("tensor '{key}' is missing on some rank of expert-parallel rank {ep}")),
        }
    }

    /// An expert tensor `key` on every expert-tensor-parallel rank of expert-parallel rank `ep`.
    fn expert_part(&mut self, h: LayerHome, ep: u64, key: &str) -> Result<Vec<StridedView>> {
        self.parts_of(h.stage, Some(ep), h.chunk, key).ok_or_else(|| self.missing(key, Some(ep)))
    }

    /// A Mixture-of-Experts block: the router, every expert of every expert-parallel rank (numbered globally:
    /// `ep * experts / EP + local`), and the shared expert and its gate.
    fn moe(&mut self, g: usize, h: LayerHome) -> Result<()> {
        let (Some(m), Some(names)) = (self.layout.moe.clone(), self.fam.moe) else {
            return Err(bad("a Mixture-of-Experts layer in a dense model"));
        };
        let router = self.layer_part(h, "mlp.router.weight")?;
        self.replicated(h.key("mlp.router.weight"), router, self.hf(g, names.router));
        if let (Some(name), Some(bias)) =
            (names.router_bias, self.parts(h.stage, h.chunk, &h.key("mlp.router.expert_bias")))
        {
            self.replicated(h.key("mlp.router.expert_bias"), bias, self.hf(g, name));
        }
        let local = m.experts / m.ep;
        for ep in 0..m.ep {
            self.check_expert_count(h, ep, local, &m)?;
            let grouped = self.parts_of(h.stage, Some(ep), h.chunk, &h.key("mlp.experts.weight1"));
            // Transformer Engine's TEGroupedMLP: one GroupedLinear per fc whose parameters are weight0..
            // (megatron/core/extensions/transformer_engine.py, _sharded_state_dict_grouped), each laid out as
            // SequentialMLP's expert is on that rank.
            let te = self.layer_has(h, Some(ep), "mlp.experts.linear_fc1.weight0");
            for j in 0..local {
                let e = ep * local + j;
                let hf = names.expert.map(|n| self.hf(g, &format!("{}.{e}.{n}", names.experts)));
                let (gate_up, down) = match &grouped {
                    Some(w1) => self.grouped_expert(h, ep, j, local, w1)?,
                    None => {
                        let (fc1, fc2) = match te {
                            true => (
                                format!("mlp.experts.linear_fc1.weight{j}"),
                                format!("mlp.experts.linear_fc2.weight{j}"),
                            ),
                            false => {
                                let module = format!("mlp.experts.local_experts.{j}");
                                (format!("{module}.linear_fc1.weight"), format!("{module}.linear_fc2.weight"))
                            }
                        };
                        (self.fc1_key(g, h, Some(ep), &fc1)?, self.expert_part(h, ep, &h.key(&fc2))?)
                    }
                };
                let [gate, up] = <[Out; 2]>::try_from(gate_up).map_err(|_| bad("an ungated expert MLP"))?;
                let [gate_name, up_name, down_name] = hf;
                self.check_expert_shape(&gate_name, &gate.shape, [m.ffn, self.layout.hidden], h, Some(ep))?;
                self.outs.push(Out { name: gate_name, ..gate });
                self.outs.push(Out { name: up_name, ..up });
                self.push_row_parallel(down_name, &down)?;
            }
        }
        if let Some(shared) = names.shared {
            let module = "mlp.shared_experts";
            if self.layer_has(h, None, &format!("{module}.linear_fc1.weight"))
                || self.layer_has(h, None, &format!("{module}.{FC1_GATE}"))
            {
                let pieces = self.fc1(g, h, None, module)?;
                let [gate, up] = <[Out; 2]>::try_from(pieces).map_err(|_| bad("an ungated shared expert"))?;
                let [gate_name, up_name, down_name] = shared.map(|n| self.hf(g, n));
                self.check_expert_shape(&gate_name, &gate.shape, [m.shared_ffn, self.layout.hidden], h, None)?;
                self.outs.push(Out { name: gate_name, ..gate });
                self.outs.push(Out { name: up_name, ..up });
                let fc2 = self.layer_part(h, &format!("{module}.linear_fc2.weight"))?;
                self.push_row_parallel(down_name, &fc2)?;
            }
        }
        if let (Some(name), Some(gate)) =
            (names.shared_gate, self.parts(h.stage, h.chunk, &h.key("mlp.shared_experts.gate_weight")))
        {
            self.replicated(h.key("mlp.shared_experts.gate_weight"), gate, self.hf(g, name));
        }
        Ok(())
    }

    /// An expert's gate projection has the shape `args` give it (`[ffn, hidden]`).
    fn check_expert_shape(
        &self,
        name: &str,
        shape: &[u64],
        want: [u64; 2],
        h: LayerHome,
        who: Option<u64>,
    ) -> Result<()> {
        if shape == want {
            return Ok(());
        }
        let file = self.first_holder(h.stage, who).map(|r| &self.inputs[r.input].name);
        let msg = format!("merges to {shape:?}, but args give an expert (gate) projection of {want:?}");
        Err(ranks_disagree(name, msg).in_file(file.map_or("", |f| f.as_str())))
    }

    /// Whether the first holder of the layer's dense tensors (`who` `None`) or of expert-parallel rank `who`'s
    /// experts holds `suffix`.
    fn layer_has(&self, h: LayerHome, who: Option<u64>, suffix: &str) -> bool {
        let r = self.first_holder(h.stage, who);
        r.is_some_and(|r| r.chunks.get(h.chunk).is_some_and(|m| m.contains_key(&h.key(suffix))))
    }

    /// Each rank of expert-parallel rank `ep` holds exactly `local` experts in this layer.
    fn check_expert_count(&self, h: LayerHome, ep: u64, local: u64, m: &MoeLayout) -> Result<()> {
        // SequentialMLP's `local_experts.J.` and TEGroupedMLP's `linear_fc1.weightJ` / `linear_fc2.weightJ`.
        let prefixes = ["mlp.experts.local_experts.", "mlp.experts.linear_fc1.weight", "mlp.experts.linear_fc2.weight"];
        for i in self.holders(h.stage, Some(ep)).unwrap_or_default() {
            let Some(r) = self.ranks.get(i) else { continue };
            let Some(map) = r.chunks.get(h.chunk) else { continue };
            let mut held: Vec<u64> = Vec::new();
            for prefix in prefixes.map(|p| h.key(p)) {
                let numbers = map
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .filter_map(|(k, _)| k[prefix.len()..].split('.').next()?.parse::<u64>().ok());
                held.extend(numbers);
            }
            held.sort_unstable();
            held.dedup();
            if !held.is_empty() && held != (0..local).collect::<Vec<_>>() {
                let (e, ep_n) = (m.experts, m.ep_saved);
                return Err(bad(format!(
                    "layer {} holds local experts {held:?}, but num_experts {e} over expert_model_parallel_size {ep_n} \
                     is {local} per rank",
                    h.local
                ))
                .in_file(&self.inputs[r.input].name));
            }
        }
        Ok(())
    }

    /// Expert `j` of the legacy GroupedMLP on expert-parallel rank `ep`: `weight1` `[H, local * 2F/TP]` and
    /// `weight2` `[local * F/TP, H]` are, in memory, `local` stacked blocks `[H, 2F/TP]` and `[F/TP, H]` (not a
    /// column or row split), each the transpose of the expert's fc1 and fc2 on that tensor-parallel rank.
    fn grouped_expert(
        &mut self,
        h: LayerHome,
        ep: u64,
        j: u64,
        local: u64,
        w1: &[StridedView],
    ) -> Result<(Vec<Out>, Vec<StridedView>)> {
        let key2 = h.key("mlp.experts.weight2");
        let w2 = self.expert_part(h, ep, &key2)?;
        let key1 = h.key("mlp.experts.weight1");
        let (hidden, f) = (self.layout.hidden, self.layout.moe.as_ref().map_or(0, |m| m.ffn) / self.etp);
        let fc1_cols = if self.layout.swiglu { 2 * f } else { f };
        let (mut fc1, mut fc2) = (Vec::new(), Vec::new());
        for (a, b) in w1.iter().zip(&w2) {
            let file = |v: &StridedView| self.inputs[v.input].name.clone();
            fc1.push(a.block_t(&key1, local, j, (hidden, fc1_cols)).map_err(|e| e.in_file(&file(a)))?);
            fc2.push(b.block_t(&key2, local, j, (f, hidden)).map_err(|e| e.in_file(&file(b)))?);
        }
        Ok((gate_up(fc1_halves(self.inputs, &key1, &fc1)?), fc2))
    }

    /// The two norms of a layer: local spec names, or Transformer Engine's fused ones.
    fn norms(&mut self, g: usize, h: LayerHome) -> Result<()> {
        let names = self.fam.names;
        for (alts, name) in [
            (["input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"], names.input_norm),
            (["pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"], names.post_attn_norm),
        ] {
            let found = alts.iter().find_map(|n| self.parts(h.stage, h.chunk, &h.key(n)).map(|p| (n, p)));
            let Some((n, p)) = found else {
                let (l, s) = (h.local, h.stage);
                return Err(bad(format!("layer {l} of stage {s} has no {}", alts.join(" or "))));
            };
            self.replicated(h.key(n), p, self.hf(g, name));
        }
        Ok(())
    }

    /// The final norm (on the last stage) and the output layer, unless the embeddings are tied.
    fn tail(&mut self, folder: &dyn Folder, vocab: u64) -> Result<()> {
        let key = "decoder.final_layernorm.weight";
        let last = (self.stages - 1, self.chunks_per_stage - 1);
        let norm = match self.parts(last.0, last.1, key) {
            Some(p) => Some(p),
            None => self.find_stage(key).and_then(|(s, v)| self.parts(s, v, key)),
        };
        let norm = norm.ok_or_else(|| bad(format!("tensor '{key}' is missing on some rank")))?;
        self.replicated(key.to_string(), norm, self.fam.names.final_norm.to_string());
        let key = "output_layer.weight";
        if let Some((s, v)) = self.find_stage(key) {
            let out = self.need(s, v, key)?;
            // With tied embeddings the last stage keeps a copy for its own use; HF has no lm_head then.
            if !self.layout.tied {
                self.outs.push(vocab_out(self.inputs, self.fam.names.lm_head, &out, vocab)?);
            }
        } else if !self.layout.tied {
            return Err(bad("untied embeddings but no output_layer.weight on any stage").in_file(folder.name()));
        }
        Ok(())
    }

    /// Everything in the checkpoint must have a place in the output. A tensor not read from this rank is a
    /// data-parallel copy of one that was read (dense tensors on other expert-parallel ranks, whole experts on
    /// other tensor-parallel ranks under expert TP 1): it must be there, with its shape.
    fn check_all_placed(&self) -> Result<()> {
        for (i, r) in self.ranks.iter().enumerate() {
            for (v, map) in r.chunks.iter().enumerate() {
                for (k, view) in map {
                    if self.used.contains(&(i, v, k.clone())) {
                        continue;
                    }
                    let file = &self.inputs[r.input].name;
                    let home = match k.contains(".mlp.experts.") {
                        false => self.dense_home.get(&(r.pp, r.tp)),
                        true if self.etp != self.tp => self.expert_home.get(&(r.pp, r.ep)),
                        true => None,
                    };
                    let copy_of = home.filter(|&&h| h != i && self.used.contains(&(h, v, k.clone()))).and_then(|&h| {
                        let r0 = self.ranks.get(h)?;
                        Some((r0, r0.chunks.get(v)?.get(k)?))
                    });
                    match copy_of {
                        Some((_, v0)) if v0.shape == view.shape && v0.dtype == view.dtype => continue,
                        Some((r0, v0)) => {
                            let msg = format!(
                                "rank (TP {}, EP {}) has shape {:?} {}, rank (TP {}, EP {}) {:?} {}",
                                r.tp,
                                r.ep,
                                view.shape,
                                view.dtype.torch_name(),
                                r0.tp,
                                r0.ep,
                                v0.shape,
                                v0.dtype.torch_name()
                            );
                            return Err(ranks_disagree(k, msg).in_file(file));
                        }
                        None => {}
                    }
                    return Err(bad(format!(
                        "tensor '{k}' has no Hugging Face equivalent for a {} model",
                        self.fam.name
                    ))
                    .in_file(file));
                }
            }
        }
        Ok(())
    }

    /// Names row pieces (q, k, v, or gate, up) after the family: one name each, or one name for a tensor that
    /// stacks them on dim 0 (Phi-3's fused qkv_proj and gate_up_proj).
    fn place(&mut self, pieces: Vec<Out>, g: usize, names: &[&str], suffix: &str) -> Result<()> {
        if names.len() == pieces.len() {
            for (mut p, n) in pieces.into_iter().zip(names) {
                p.name = self.hf(g, &format!("{n}{suffix}"));
                self.outs.push(p);
            }
            return Ok(());
        }
        let [n] = names else {
            let msg = format!("the {} table names {} tensors for {} pieces", self.fam.name, names.len(), pieces.len());
            return Err(bad(msg));
        };
        self.outs.push(stack(self.hf(g, &format!("{n}{suffix}")), pieces));
        Ok(())
    }

    /// What `inspect` shows about the merge.
    fn note(&self, vocab: u64) -> String {
        let (l, (tp, pp)) = (self.layout, (self.layout.tp, self.layout.pp));
        let virt = self.chunks_per_stage;
        format!(
            "Megatron grid TP={tp} x PP={pp}{}, {} layout: {} layers, hidden {}, {} heads in {} groups of dim {}, ffn {}, vocab {} padded to {}{}{}",
            if virt > 1 { format!(" (virtual pipeline x{virt})") } else { String::new() },
            self.fam.name,
            l.num_layers,
            l.hidden,
            l.heads,
            l.groups,
            l.kv_channels,
            l.ffn,
            vocab,
            l.padded_vocab,
            if l.tied { ", tied embeddings" } else { "" },
            if l.qkv_bias { ", qkv bias" } else { "" },
        ) + &self.moe_note()
    }

    /// The Mixture-of-Experts part of the note.
    fn moe_note(&self) -> String {
        let Some(m) = &self.layout.moe else { return String::new() };
        let topk = if m.topk > 0 { format!(" (top-{})", m.topk) } else { String::new() };
        let shared = if m.shared_ffn > 0 { format!(", shared expert ffn {}", m.shared_ffn) } else { String::new() };
        let routing = if m.pre_softmax { "softmax over all experts" } else { "top-k renormalised" };
        format!(
            "; MoE: {} experts{topk} of ffn {}{shared}, {routing}, saved with EP={} x expert TP={}",
            m.experts, m.ffn, m.ep_saved, m.etp
        )
    }
}

/// A base config that says its first k layers are dense (DeepSeek's `first_k_dense_replace`) describes the
/// checkpoint's mix of dense and Mixture-of-Experts layers.
fn check_dense_layers(moe_layers: &[bool], base: Option<&BaseModel>, file: &str) -> Result<()> {
    let Some(k) = base.and_then(|b| b.int("first_k_dense_replace")) else { return Ok(()) };
    if !moe_layers.iter().any(|&m| m) {
        return Ok(());
    }
    let dense: Vec<usize> = moe_layers.iter().enumerate().filter(|(_, m)| !**m).map(|(i, _)| i).collect();
    if dense.iter().copied().eq(0..k as usize) {
        return Ok(());
    }
    let base_name = base.map_or("", |b| b.folder.name());
    Err(Error::new(ErrorKind::Inconsistent(format!(
        "the base config.json says first_k_dense_replace = {k}, but the checkpoint's dense (router-less) layers \
         are {dense:?} (from {file})"
    )))
    .in_file(&format!("{base_name}/config.json")))
}

/// The ranks of one checkpoint (or the checkpoint and its base model) disagree about tensor `name`.
fn ranks_disagree(name: &str, msg: String) -> Error {
    Error::new(ErrorKind::Inconsistent(format!("tensor '{name}': {msg}")))
}

/// Concatenates `parts` along `dim` into one chunked tensor.
fn concat(inputs: &[Input], name: &str, parts: &[StridedView], dim: usize) -> Result<(Vec<u64>, Vec<Chunk>)> {
    let first = parts.first().ok_or_else(|| tensor_err(name, "no parts"))?;
    let mut shape = first.shape.clone();
    if dim >= shape.len() {
        return Err(tensor_err(name, format!("cannot concatenate a {}-d tensor on dim {dim}", shape.len())));
    }
    shape[dim] = 0;
    let mut chunks = Vec::new();
    for p in parts {
        if p.shape.len() != first.shape.len()
            || p.shape.iter().zip(&first.shape).enumerate().any(|(d, (a, b))| d != dim && a != b)
            || p.dtype != first.dtype
        {
            let (ps, fs) = ((&p.shape, p.dtype.torch_name()), (&first.shape, first.dtype.torch_name()));
            let msg = format!("tensor-parallel parts disagree: {:?} {} vs {:?} {}", ps.0, ps.1, fs.0, fs.1);
            return Err(ranks_disagree(name, msg).in_file(&inputs[p.input].name));
        }
        let mut offsets = vec![0u64; shape.len()];
        offsets[dim] = shape[dim];
        shape[dim] += p.shape[dim];
        if p.numel() > 0 {
            chunks.push(Chunk { offsets, sizes: p.shape.clone(), view: p.clone() });
        }
    }
    Ok((shape, chunks))
}

fn finish(o: Out) -> Result<(String, ChunkedTensor)> {
    let boxes: Vec<(&[u64], &[u64])> = o.chunks.iter().map(|c| (c.offsets.as_slice(), c.sizes.as_slice())).collect();
    check_tiling(&o.name, &o.shape, &boxes)?;
    let t = ChunkedTensor::new(&o.name, o.shape, o.dtype, o.chunks)?;
    Ok((o.name, t))
}

/// Checks that replicated copies hold the same bytes on every tensor-parallel rank.
fn check_replicated(inputs: &[Input], name: &str, parts: &[StridedView]) -> Result<()> {
    let Some(first) = parts.first() else { return Ok(()) };
    let mut window = crate::plan::Window::default();
    let n = first.numel();
    let esz = first.dtype.size() as u64;
    let step = (1u64 << 20) / esz;
    let mut a = Vec::new();
    let mut b = Vec::new();
    for (r, p) in parts.iter().enumerate().skip(1) {
        if p.shape != first.shape || p.dtype != first.dtype {
            let msg = format!("tensor-parallel rank {r} has shape {:?}, rank 0 {:?}", p.shape, first.shape);
            return Err(ranks_disagree(name, msg).in_file(&inputs[p.input].name));
        }
        let mut at = 0;
        while at < n {
            let c = step.min(n - at);
            a.resize((c * esz) as usize, 0);
            b.resize((c * esz) as usize, 0);
            first.read(inputs, at, c, &mut a, &mut window)?;
            p.read(inputs, at, c, &mut b, &mut window)?;
            if a != b {
                return Err(ranks_disagree(
                    name,
                    format!(
                        "replicated across tensor-parallel ranks, but rank {r} differs from rank 0 (corrupt or mismatched shards)"
                    ),
                )
                .in_file(&inputs[p.input].name));
            }
            at += c;
        }
    }
    Ok(())
}

fn whole(v: &StridedView) -> Chunk {
    Chunk { offsets: vec![0; v.shape.len()], sizes: v.shape.clone(), view: v.clone() }
}

/// A vocabulary-parallel tensor stacked on dim 0 and cut to the first `vocab` rows.
fn vocab_out(inputs: &[Input], name: &str, parts: &[StridedView], vocab: u64) -> Result<Out> {
    let (mut shape, chunks) = concat(inputs, name, parts, 0)?;
    if vocab > shape[0] {
        return Err(ranks_disagree(
            name,
            format!("the base config's vocab_size {vocab} exceeds the checkpoint's {} rows", shape[0]),
        ));
    }
    let mut kept = Vec::new();
    for c in chunks {
        let start = c.offsets[0];
        if start >= vocab {
            continue;
        }
        let keep = c.sizes[0].min(vocab - start);
        let view = c.view.rows(name, 0, keep)?;
        let mut sizes = c.sizes.clone();
        sizes[0] = keep;
        kept.push(Chunk { offsets: c.offsets, sizes, view });
    }
    shape[0] = vocab;
    let dtype = parts[0].dtype;
    Ok(Out { name: name.into(), shape, dtype, chunks: kept })
}

/// Splits the fused QKV into q, k and v, unnamed (`prefix` and `what` name the fused tensor in messages). The
/// ranks' rows, stacked, are `[groups][q heads, k, v][head_dim]`; with at least as many groups as ranks each rank
/// holds whole groups, with fewer (megatron-core's TP > query groups) a group's block straddles ranks, since
/// `linear_qkv` keeps its full size and is split evenly (megatron/core/transformer/attention.py).
fn split_qkv(inputs: &[Input], prefix: &str, what: &str, parts: &[StridedView], l: &Layout) -> Result<Vec<Out>> {
    let (hd, hpg) = (l.kv_channels, l.heads / l.groups);
    let tp = parts.len() as u64;
    let per_group = (hpg + 2) * hd;
    let rows_r = (l.groups * per_group) / tp.max(1);
    let name = format!("{prefix}.qkv.{what}");
    for (r, p) in parts.iter().enumerate() {
        if rows_r * tp != l.groups * per_group || p.shape.first() != Some(&rows_r) {
            let msg = format!(
                "rank {r} holds {:?} but {} groups x ({hpg} q + k + v) x {hd} rows over {tp} ranks were expected",
                p.shape, l.groups
            );
            let file = inputs.get(p.input).map_or("", |i| i.name.as_str());
            return Err(ranks_disagree(&name, msg).in_file(file));
        }
    }
    // Rows [from, from + n) of the stacked ranks, placed at row `at` of `dst`, cut where a rank ends.
    let take = |dst: &mut Vec<Chunk>, from: u64, n: u64, at: u64| -> Result<()> {
        let mut done = 0;
        while done < n {
            let row = from + done;
            let (r, local) = ((row / rows_r) as usize, row % rows_r);
            let len = (rows_r - local).min(n - done);
            let view = parts[r].rows(&name, local, local + len)?;
            let mut offsets = vec![0u64; view.shape.len()];
            offsets[0] = at + done;
            dst.push(Chunk { offsets, sizes: view.shape.clone(), view });
            done += len;
        }
        Ok(())
    };
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for g in 0..l.groups {
        let base = g * per_group;
        take(&mut q, base, hpg * hd, g * hpg * hd)?;
        take(&mut k, base + hpg * hd, hd, g * hd)?;
        take(&mut v, base + (hpg + 1) * hd, hd, g * hd)?;
    }
    let rest: Vec<u64> = parts[0].shape[1..].to_vec();
    let dtype = parts[0].dtype;
    let mk = |rows: u64, chunks: Vec<Chunk>| {
        let mut shape = vec![rows];
        shape.extend(&rest);
        Out { name: String::new(), shape, dtype, chunks }
    };
    Ok(vec![mk(l.heads * hd, q), mk(l.groups * hd, k), mk(l.groups * hd, v)])
}

/// Each rank's SwiGLU fc1 (`[gate_r; up_r]`) cut into its gate and up halves.
fn fc1_halves(inputs: &[Input], name: &str, parts: &[StridedView]) -> Result<(Vec<StridedView>, Vec<StridedView>)> {
    let (mut gate, mut up) = (Vec::new(), Vec::new());
    for p in parts {
        let rows = p.shape.first().copied().unwrap_or(0);
        if rows % 2 != 0 {
            return Err(tensor_err(name, format!("fc1 has an odd number of rows ({rows}) for a gated MLP"))
                .in_file(&inputs[p.input].name));
        }
        gate.push(p.rows(name, 0, rows / 2)?);
        up.push(p.rows(name, rows / 2, rows)?);
    }
    Ok((gate, up))
}

/// Gate and up, each the ranks' halves stacked on dim 0, unnamed.
fn gate_up((gate, up): (Vec<StridedView>, Vec<StridedView>)) -> Vec<Out> {
    [gate, up]
        .into_iter()
        .map(|parts| {
            let mut chunks = Vec::new();
            let mut at = 0u64;
            for view in parts {
                let mut offsets = vec![0u64; view.shape.len()];
                offsets[0] = at;
                at += view.shape.first().copied().unwrap_or(0);
                chunks.push(Chunk { offsets, sizes: view.shape.clone(), view });
            }
            let mut shape = chunks.first().map(|c| c.sizes.clone()).unwrap_or_default();
            if let Some(rows) = shape.first_mut() {
                *rows = at;
            }
            let dtype = chunks.first().map_or(DType::F32, |c| c.view.dtype);
            Out { name: String::new(), shape, dtype, chunks }
        })
        .collect()
}

/// One tensor `name` stacking `pieces` on dim 0, in order: their chunks moved down by the rows before them.
fn stack(name: String, pieces: Vec<Out>) -> Out {
    let mut shape = pieces.first().map(|p| p.shape.clone()).unwrap_or_default();
    let dtype = pieces.first().map_or(DType::F32, |p| p.dtype);
    let mut at = 0u64;
    let mut chunks = Vec::new();
    for p in pieces {
        for mut c in p.chunks {
            if let Some(row) = c.offsets.first_mut() {
                *row += at;
            }
            chunks.push(c);
        }
        at += p.shape.first().copied().unwrap_or(0);
    }
    if let Some(rows) = shape.first_mut() {
        *rows = at;
    }
    Out { name, shape, dtype, chunks }
}

/// For each key, the index of its entry with the lowest rank.
fn lowest(entries: impl Iterator<Item = ((u64, u64), u64, usize)>) -> HashMap<(u64, u64), usize> {
    let mut best: HashMap<(u64, u64), (u64, usize)> = HashMap::new();
    for (key, rank, i) in entries {
        let e = best.entry(key).or_insert((rank, i));
        if rank < e.0 {
            *e = (rank, i);
        }
    }
    best.into_iter().map(|(k, (_, i))| (k, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank `r`'s fused QKV for 4 heads in 2 groups of head dim 1, one group per rank: rows [q, q, k, v].
    fn rank_qkv(r: usize) -> Result<StridedView> {
        StridedView::new("qkv", r, 0, 48, DType::F32, 0, vec![4, 3], vec![3, 1], 2)
    }

    #[test]
    fn fused_qkv_stacks_all_q_then_k_then_v_as_views() -> Result<()> {
        let l = Layout { heads: 4, groups: 2, kv_channels: 1, ..Layout::default() };
        let parts = [rank_qkv(0)?, rank_qkv(1)?];
        let pieces = split_qkv(&[], "p", "weight", &parts, &l)?;
        let fused = stack("qkv_proj".into(), pieces);
        assert_eq!(fused.shape, vec![8, 3]);
        // (first output row, rank, first row in that rank's tensor) of every chunk
        let rows: Vec<(u64, usize, u64)> =
            fused.chunks.iter().map(|c| (c.offsets[0], c.view.input, c.view.offset / 3)).collect();
        assert_eq!(rows, vec![(0, 0, 0), (2, 1, 0), (4, 0, 2), (5, 1, 2), (6, 0, 3), (7, 1, 3)]);
        finish(fused)?; // the chunks tile the fused tensor
        Ok(())
    }

    #[test]
    fn fewer_groups_than_ranks_cut_a_group_where_a_rank_ends() -> Result<()> {
        // 4 heads in 1 group of head dim 1 at TP 2: the stacked rows [q q q q k v] are [q q q] on rank 0 and
        // [q k v] on rank 1, so q straddles the ranks.
        let l = Layout { heads: 4, groups: 1, kv_channels: 1, ..Layout::default() };
        let part = |r| StridedView::new("qkv", r, 0, 36, DType::F32, 0, vec![3, 3], vec![3, 1], 2);
        let pieces = split_qkv(&[], "p", "weight", &[part(0)?, part(1)?], &l)?;
        let rows = |o: &Out| o.chunks.iter().map(|c| (c.offsets[0], c.view.input, c.view.offset / 3)).collect();
        let got: Vec<Vec<(u64, usize, u64)>> = pieces.iter().map(rows).collect();
        assert_eq!(got, vec![vec![(0, 0, 0), (3, 1, 0)], vec![(0, 1, 1)], vec![(0, 1, 2)]]);
        for p in pieces {
            finish(p)?;
        }
        // Rows that do not split evenly over the ranks are refused.
        let odd = |r| StridedView::new("qkv", r, 0, 48, DType::F32, 0, vec![4, 3], vec![3, 1], 2);
        let l3 = Layout { heads: 1, groups: 1, kv_channels: 1, ..Layout::default() };
        assert!(split_qkv(&[], "p", "weight", &[odd(0)?, odd(1)?], &l3).is_err());
        Ok(())
    }
}
