//! Megatron-LM legacy checkpoints: `iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt`, one file per tensor-
//! and pipeline-parallel rank, merged into a Hugging Face Qwen2/Qwen3/Llama/Mistral state dict.
//!
//! The layout comes from the checkpoint itself: the rank grid from the folder names, the hyperparameters
//! from the pickled `args` Namespace (or, without it, from tensor shapes and the base `config.json`),
//! cross-checked against the base config. Every merge is a view: column-parallel tensors stack on dim 0,
//! row-parallel ones on dim 1, the fused QKV splits per query group into q/k/v, SwiGLU's fc1 splits per
//! rank into gate/up, and the padded vocabulary is trimmed. Replicated tensors must match across ranks.

use crate::convert::{PlanOptions, Planned, add_group, group_of, selection_notes};
use crate::dcp::join;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result, tensor_err};
use crate::hf::BaseModel;
use crate::io::{Folder, Input};
use crate::pickle::{Heap, Id, Node};
use crate::plan::{Chunk, ChunkedTensor, Plan, PlannedTensor, Source, StridedView, check_tiling};
use crate::select::{self, Selection, TensorPath};
use crate::torch::TorchFile;
use std::collections::{BTreeMap, HashMap};

mod dist;

pub use dist::is_dist;

const RANK_FILE: &str = "model_optim_rng.pt";
/// Keys under which torch_dist's separately stored SwiGLU halves stand in for a rank's fc1 (no Megatron name
/// ends this way, so they cannot clash with a real key).
const FC1_GATE: &str = "mlp.linear_fc1.gate";
const FC1_UP: &str = "mlp.linear_fc1.up";

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Inconsistent(msg.into()))
}

fn show(v: Option<u64>) -> String {
    v.map_or("absent".into(), |v| v.to_string())
}

/// Parses `mp_rank_TT[_PPP]` into `(tp, pp)`; expert parallelism (a third field) is refused.
fn parse_rank_dir(name: &str) -> Option<std::result::Result<(u64, u64), String>> {
    let rest = name.strip_prefix("mp_rank_")?;
    let parts: Vec<&str> = rest.split('_').collect();
    let num = |s: &str| s.parse::<u64>().ok();
    Some(match parts.as_slice() {
        [tp] => num(tp).map(|t| (t, 0)).ok_or_else(|| format!("bad rank folder {name}")),
        [tp, pp] => num(tp).zip(num(pp)).ok_or_else(|| format!("bad rank folder {name}")),
        _ => Err(format!("{name}: expert-parallel checkpoints are not supported yet")),
    })
}

/// Finds the iteration folder (the one holding `mp_rank_*`, or a torch_dist checkpoint) inside `folder`: the
/// folder itself, `release`/`iter_XXXXXXX` named by `latest_checkpointed_iteration.txt`, or the newest `iter_*`,
/// also under `actor/`.
pub fn find_iter_dir(folder: &dyn Folder, files: &[String]) -> Result<Option<String>> {
    let holds_ranks = |dir: &str| {
        let p = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        is_dist(files, dir)
            || files.iter().any(|f| {
                f.strip_prefix(&p)
                    .and_then(|r| r.split_once('/'))
                    .is_some_and(|(d, file)| d.starts_with("mp_rank_") && file == RANK_FILE)
            })
    };
    for base in ["", "actor"] {
        if holds_ranks(base) {
            return Ok(Some(base.to_string()));
        }
        let tracker = join(base, "latest_checkpointed_iteration.txt");
        if files.contains(&tracker) {
            let input = folder.open(&tracker)?;
            let text = input.read_vec(0, input.len().min(64))?;
            let text = String::from_utf8_lossy(&text).trim().to_string();
            let dir = match text.as_str() {
                "release" => join(base, "release"),
                n => match n.parse::<u64>() {
                    Ok(i) => join(base, &format!("iter_{i:07}")),
                    Err(_) => {
                        return Err(bad(format!("'{n}' is not an iteration number")).in_file(&input.name));
                    }
                },
            };
            if !holds_ranks(&dir) {
                return Err(bad(format!(
                    "it names {dir}, which holds no mp_rank_*/{RANK_FILE} (nor a torch_dist checkpoint)"
                ))
                .in_file(&input.name));
            }
            return Ok(Some(dir));
        }
        // No tracker: the newest iteration folder.
        let prefix = if base.is_empty() { String::new() } else { format!("{base}/") };
        let newest = files
            .iter()
            .filter_map(|f| f.strip_prefix(&prefix)?.split('/').next().filter(|d| d.starts_with("iter_")))
            .max()
            .map(|d| join(base, d));
        if let Some(d) = newest
            && holds_ranks(&d)
        {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

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
}

fn ns_field(h: &Heap, ns: Id, key: &str) -> Option<Id> {
    h.dict_get(ns, key)
}

fn ns_int(h: &Heap, ns: Id, key: &str) -> Option<u64> {
    ns_field(h, ns, key).and_then(|v| h.as_int(v)).and_then(|v| u64::try_from(v).ok())
}

fn ns_bool(h: &Heap, ns: Id, key: &str) -> Option<bool> {
    match ns_field(h, ns, key).map(|v| h.get(v)) {
        Some(Node::Bool(b)) => Some(*b),
        Some(Node::Int(i)) => Some(*i != 0),
        _ => None,
    }
}

/// What `args` says, field by field (`None` where absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Args {
    fields: BTreeMap<&'static str, Option<u64>>,
}

const INT_ARGS: &[&str] = &[
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "padded_vocab_size",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
];
const BOOL_ARGS: &[&str] =
    &["swiglu", "add_qkv_bias", "untie_embeddings_and_output_weights", "group_query_attention", "qk_layernorm"];

fn read_args(h: &Heap, ns: Id) -> Args {
    let mut fields = BTreeMap::new();
    for k in INT_ARGS {
        fields.insert(*k, ns_int(h, ns, k));
    }
    for k in BOOL_ARGS {
        fields.insert(*k, ns_bool(h, ns, k).map(u64::from));
    }
    Args { fields }
}

impl Args {
    fn get(&self, k: &str) -> Option<u64> {
        self.fields.get(k).copied().flatten()
    }
    fn flag(&self, k: &str) -> Option<bool> {
        self.get(k).map(|v| v != 0)
    }
    /// A printable summary for `inspect`.
    fn summary(&self) -> String {
        self.fields.iter().filter_map(|(k, v)| v.map(|v| format!("{k}={v}"))).collect::<Vec<_>>().join(" ")
    }
}

/// One rank's model tensors, by local name, per virtual-pipeline chunk.
struct RankModel {
    tp: u64,
    pp: u64,
    input: usize,
    chunks: Vec<BTreeMap<String, StridedView>>,
    args: Option<Args>,
}

fn load_rank(folder: &dyn Folder, rel: &str, tp: u64, pp: u64, idx: usize) -> Result<(Input, RankModel)> {
    let input = folder.open(rel)?;
    let file = TorchFile::open(&input)?;
    let h = &file.heap;
    let args = h.dict_get(file.root, "args").filter(|&a| !matches!(h.get(a), Node::None)).map(|a| read_args(h, a));
    let mut chunks = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    if let Node::Dict(items) = h.get(file.root) {
        keys = items.iter().filter_map(|&(k, _)| h.as_str(k).map(str::to_string)).collect();
    }
    let mut model_keys: Vec<(u64, String)> = keys
        .iter()
        .filter_map(|k| match k.as_str() {
            "model" => Some((0, k.clone())),
            _ => k.strip_prefix("model").and_then(|n| n.parse::<u64>().ok()).map(|n| (n, k.clone())),
        })
        .collect();
    model_keys.sort();
    if model_keys.is_empty() {
        return Err(bad("no 'model' entry (expected a Megatron model_optim_rng.pt)").in_file(&input.name));
    }
    for (_, key) in model_keys {
        let Some(id) = h.dict_get(file.root, &key) else { continue };
        let found = file.tensors_at(&input, idx, id, Vec::new())?;
        let mut map = BTreeMap::new();
        for t in found {
            if t.path.name.ends_with("_extra_state") {
                continue;
            }
            map.insert(t.path.name, t.view);
        }
        chunks.push(map);
    }
    Ok((input, RankModel { tp, pp, input: idx, chunks, args }))
}

/// Hugging Face architecture family of the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Qwen2,
    Qwen3,
    Llama,
}

fn family(base: &BaseModel) -> Result<Family> {
    let mt = base.text("model_type").unwrap_or("");
    Ok(match mt {
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "llama" | "mistral" => Family::Llama,
        other => {
            return Err(Error::new(ErrorKind::Unsupported(format!(
                "base model_type '{other}': Megatron conversion supports qwen2 (incl. DeepSeek-R1-Distill-Qwen), qwen3, llama and mistral"
            )))
            .in_file(base.folder.name()));
        }
    })
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
            return Err(ranks_disagree(
                name,
                format!(
                    "tensor-parallel parts disagree: {:?} {} vs {:?} {}",
                    p.shape,
                    p.dtype.torch_name(),
                    first.shape,
                    first.dtype.torch_name()
                ),
            )
            .in_file(&inputs[p.input].name));
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

/// One output tensor under construction.
struct Out {
    name: String,
    shape: Vec<u64>,
    dtype: DType,
    chunks: Vec<Chunk>,
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
            return Err(ranks_disagree(
                name,
                format!("tensor-parallel rank {r} has shape {:?}, rank 0 {:?}", p.shape, first.shape),
            )
            .in_file(&inputs[p.input].name));
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

/// Plans the Megatron checkpoint at `dir` inside `folder`, as the HF model of `base`.
pub fn plan_megatron(
    folder: &dyn Folder,
    dir: &str,
    base: Option<&BaseModel>,
    opts: &PlanOptions,
) -> Result<(Planned, String)> {
    if is_dist(&folder.files(), dir) {
        let d = dist::load_dist(folder, dir)?;
        let format = format!("Megatron-LM torch_dist checkpoint ({} .distcp file(s) used)", d.files);
        return plan_ranks(folder, d.inputs, d.ranks, d.args, (d.tp, d.pp), 1, base, opts, format);
    }
    let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    let mut grid: Vec<(u64, u64, String)> = Vec::new();
    for f in folder.files() {
        let Some((d, file)) = f.strip_prefix(&prefix).and_then(|r| r.split_once('/')) else { continue };
        if file != RANK_FILE {
            continue;
        }
        if let Some(parsed) = parse_rank_dir(d) {
            let (tp, pp) = parsed.map_err(|m| Error::new(ErrorKind::Unsupported(m)).in_file(folder.name()))?;
            grid.push((tp, pp, f.clone()));
        }
    }
    grid.sort_by_key(|g| (g.1, g.0));
    let mut tp = grid.iter().map(|g| g.0).max().map_or(0, |m| m + 1);
    let mut pp = grid.iter().map(|g| g.1).max().map_or(0, |m| m + 1);
    if tp == 0 || tp * pp > 4096 {
        return Err(bad(format!("no usable mp_rank_* grid in {dir}")).in_file(folder.name()));
    }
    // The first rank's args say how big the grid should be, so a missing last rank is named as such.
    let Some((t0, s0, rel0)) = grid.first() else {
        return Err(bad(format!("no mp_rank_* folders in {dir}")).in_file(folder.name()));
    };
    let first = load_rank(folder, rel0, *t0, *s0, 0)?;
    if let Some(a) = &first.1.args {
        tp = tp.max(a.get("tensor_model_parallel_size").unwrap_or(0).min(4096));
        pp = pp.max(a.get("pipeline_model_parallel_size").unwrap_or(0).min(4096));
    }
    let multi_pp = pp > 1 || grid.iter().any(|g| g.2.contains(&format!("mp_rank_{:02}_", g.0)));
    for s in 0..pp {
        for t in 0..tp {
            if !grid.iter().any(|g| g.0 == t && g.1 == s) {
                let want = if multi_pp { format!("mp_rank_{t:02}_{s:03}") } else { format!("mp_rank_{t:02}") };
                return Err(bad(format!(
                    "the rank grid is {tp}x{pp} (TP x PP) but {prefix}{want}/{RANK_FILE} is missing"
                ))
                .in_file(folder.name()));
            }
        }
    }
    let (input0, rank0) = first;
    let mut inputs = vec![input0];
    let mut ranks = vec![rank0];
    for (t, s, rel) in &grid[1..] {
        let (input, m) = load_rank(folder, rel, *t, *s, inputs.len())?;
        inputs.push(input);
        ranks.push(m);
    }
    // args must agree across ranks (apart from nothing: every field here is global).
    let args = ranks[0].args.clone();
    for r in &ranks[1..] {
        if r.args != args {
            let diff = match (&args, &r.args) {
                (Some(a), Some(b)) => a
                    .fields
                    .iter()
                    .filter(|(k, v)| b.fields.get(*k) != Some(v))
                    .map(|(k, v)| {
                        format!("{k}: {} on rank 0, {} here", show(*v), show(b.fields.get(k).copied().flatten()))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => "args present on one rank only".into(),
            };
            return Err(bad(format!("args differ from rank 0's ({diff})")).in_file(&inputs[r.input].name));
        }
    }
    let format = format!("Megatron-LM checkpoint ({} rank files)", inputs.len());
    plan_ranks(folder, inputs, ranks, args, (tp, pp), pp, base, opts, format)
}

/// Plans the HF model of `base` from the model tensors of every rank. `grid` is the (TP, PP) grid the
/// checkpoint was saved from; `stages` is how many pipeline stages `ranks` are split into (the grid's PP for rank
/// files, 1 when the layers are already numbered globally).
#[allow(clippy::too_many_arguments)]
fn plan_ranks(
    folder: &dyn Folder,
    inputs: Vec<Input>,
    ranks: Vec<RankModel>,
    args: Option<Args>,
    (tp, pp): (u64, u64),
    stages: u64,
    base: Option<&BaseModel>,
    opts: &PlanOptions,
    format: String,
) -> Result<(Planned, String)> {
    let layout = derive_layout(&ranks, args.as_ref(), base, tp, pp, &inputs[0].name)?;
    // Without a base model (inspect only) the family is guessed from the layout and nothing is trimmed.
    let fam = match base {
        Some(b) => family(b)?,
        None if layout.qk_norm => Family::Qwen3,
        None if layout.qkv_bias => Family::Qwen2,
        None => Family::Llama,
    };
    let out_dtype_default =
        base.and_then(|b| b.text("torch_dtype").or(b.text("dtype"))).and_then(DType::from_torch_name);
    let target = opts.dtype.or(out_dtype_default);
    let vocab = base.and_then(|b| b.int("vocab_size")).unwrap_or(layout.padded_vocab);

    // Global layer order: virtual chunk, then stage, then local index.
    let chunks_per_stage = ranks.iter().map(|r| r.chunks.len()).max().unwrap_or(1);
    let mut layer_home: Vec<(u64, usize, u64)> = Vec::new(); // (stage, chunk, local index)
    for v in 0..chunks_per_stage {
        for s in 0..stages {
            let r0 = ranks.iter().find(|r| r.pp == s && r.tp == 0).ok_or_else(|| bad("rank grid hole"))?;
            let Some(map) = r0.chunks.get(v) else { continue };
            let mut locals: Vec<u64> =
                map.keys().filter_map(|k| k.strip_prefix("decoder.layers.")?.split('.').next()?.parse().ok()).collect();
            locals.sort_unstable();
            locals.dedup();
            for (i, &l) in locals.iter().enumerate() {
                if l != i as u64 {
                    return Err(bad(format!("stage {s} holds layers {locals:?}: local layer numbers must run from 0")))
                        .map_err(|e| e.in_file(&inputs[r0.input].name));
                }
                layer_home.push((s, v, l));
            }
        }
    }
    if layer_home.len() as u64 != layout.num_layers {
        return Err(bad(format!(
            "the checkpoint holds {} layers but num_layers is {}",
            layer_home.len(),
            layout.num_layers
        ))
        .in_file(folder.name()));
    }

    let mut used: HashMap<(u64, usize, String), bool> = HashMap::new();
    let parts =
        |s: u64, v: usize, key: &str, used: &mut HashMap<(u64, usize, String), bool>| -> Option<Vec<StridedView>> {
            let mut out = Vec::new();
            for t in 0..tp {
                let r = ranks.iter().find(|r| r.pp == s && r.tp == t)?;
                out.push(r.chunks.get(v)?.get(key)?.clone());
            }
            used.insert((s, v, key.to_string()), true);
            Some(out)
        };
    let mut outs: Vec<Out> = Vec::new();
    let mut replicated: Vec<(String, Vec<StridedView>)> = Vec::new();
    let need = |x: Option<Vec<StridedView>>, key: &str| {
        x.ok_or_else(|| bad(format!("tensor '{key}' is missing on some rank")))
    };
    let last = stages - 1;
    let find_stage = |key: &str| -> Option<(u64, usize)> {
        (0..stages).flat_map(|s| (0..chunks_per_stage).map(move |v| (s, v))).find(|&(s, v)| {
            ranks.iter().any(|r| r.pp == s && r.tp == 0 && r.chunks.get(v).is_some_and(|m| m.contains_key(key)))
        })
    };

    // Embedding (column-parallel on the vocabulary), trimmed to the HF vocabulary.
    let emb_key = "embedding.word_embeddings.weight";
    let (es, ev) =
        find_stage(emb_key).ok_or_else(|| bad(format!("no {emb_key} on any stage")).in_file(folder.name()))?;
    let emb = need(parts(es, ev, emb_key, &mut used), emb_key)?;
    outs.push(vocab_out(&inputs, "model.embed_tokens.weight", &emb, vocab)?);

    let hd = layout.kv_channels;
    let hpg = layout.heads / layout.groups;
    for (g, &(s, v, l)) in layer_home.iter().enumerate() {
        let k = |suffix: &str| format!("decoder.layers.{l}.{suffix}");
        let hf = |suffix: &str| format!("model.layers.{g}.{suffix}");
        let get = |suffix: &str, used: &mut HashMap<(u64, usize, String), bool>| parts(s, v, &k(suffix), used);
        // Attention.
        let qkv = need(get("self_attention.linear_qkv.weight", &mut used), &k("self_attention.linear_qkv.weight"))?;
        outs.extend(split_qkv(&inputs, &hf("self_attn"), "weight", &qkv, &layout, hpg, hd)?);
        // Qwen2 always has q/k/v biases; Qwen3 and Llama only with `attention_bias: true`.
        let bias_flag = base.and_then(|b| b.flag("attention_bias"));
        if let Some(b) = get("self_attention.linear_qkv.bias", &mut used) {
            if fam != Family::Qwen2 && base.is_some() && bias_flag != Some(true) {
                return Err(bad(format!(
                    "{} has a qkv bias, but the base {fam:?} config has no attention_bias: true",
                    k("self_attention.linear_qkv.bias")
                )));
            }
            outs.extend(split_qkv(&inputs, &hf("self_attn"), "bias", &b, &layout, hpg, hd)?);
        } else if fam != Family::Qwen2 && bias_flag == Some(true) {
            return Err(bad(format!(
                "{} is missing, but the base {fam:?} config says attention_bias: true",
                k("self_attention.linear_qkv.bias")
            )));
        } else if fam == Family::Qwen2 {
            return Err(bad(format!(
                "{} is missing: Qwen2 attention has q/k/v biases",
                k("self_attention.linear_qkv.bias")
            )));
        }
        for (mg, name) in [
            ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
            ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
        ] {
            if let Some(p) = get(mg, &mut used) {
                replicated.push((k(mg), p.clone()));
                outs.push(Out {
                    name: hf(name),
                    shape: p[0].shape.clone(),
                    dtype: p[0].dtype,
                    chunks: vec![whole(&p[0])],
                });
            }
        }
        let proj = need(get("self_attention.linear_proj.weight", &mut used), &k("self_attention.linear_proj.weight"))?;
        let (shape, chunks) = concat(&inputs, &hf("self_attn.o_proj.weight"), &proj, 1)?;
        outs.push(Out { name: hf("self_attn.o_proj.weight"), shape, dtype: proj[0].dtype, chunks });
        // MLP.
        if !layout.swiglu {
            return Err(Error::new(ErrorKind::Unsupported("non-gated MLPs have no Qwen/Llama equivalent".into())));
        }
        // Rank files hold each rank's [gate_r; up_r]; torch_dist stores the halves apart (see load_dist).
        let halves = match get("mlp.linear_fc1.weight", &mut used) {
            Some(fc1) => fc1_halves(&inputs, &hf("mlp.linear_fc1"), &fc1)?,
            None => {
                let gate = get(FC1_GATE, &mut used);
                let up = get(FC1_UP, &mut used);
                let (Some(gate), Some(up)) = (gate, up) else {
                    return Err(bad(format!("tensor '{}' is missing on some rank", k("mlp.linear_fc1.weight"))));
                };
                (gate, up)
            }
        };
        outs.extend(gate_up(&hf("mlp"), halves));
        let fc2 = need(get("mlp.linear_fc2.weight", &mut used), &k("mlp.linear_fc2.weight"))?;
        let (shape, chunks) = concat(&inputs, &hf("mlp.down_proj.weight"), &fc2, 1)?;
        outs.push(Out { name: hf("mlp.down_proj.weight"), shape, dtype: fc2[0].dtype, chunks });
        // Norms: local spec names, or Transformer Engine's fused ones.
        for (names, hf_name) in [
            (["input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"], "input_layernorm.weight"),
            (["pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"], "post_attention_layernorm.weight"),
        ] {
            let p = names.iter().find_map(|n| get(n, &mut used).map(|p| (n, p)));
            let (n, p) = p.ok_or_else(|| bad(format!("layer {l} of stage {s} has no {}", names.join(" or "))))?;
            replicated.push((k(n), p.clone()));
            outs.push(Out {
                name: hf(hf_name),
                shape: p[0].shape.clone(),
                dtype: p[0].dtype,
                chunks: vec![whole(&p[0])],
            });
        }
    }
    let norm_key = "decoder.final_layernorm.weight";
    let norm = need(
        parts(last, chunks_per_stage - 1, norm_key, &mut used).or_else(|| {
            let (s, v) = find_stage(norm_key)?;
            parts(s, v, norm_key, &mut used)
        }),
        norm_key,
    )?;
    replicated.push((norm_key.to_string(), norm.clone()));
    outs.push(Out {
        name: "model.norm.weight".into(),
        shape: norm[0].shape.clone(),
        dtype: norm[0].dtype,
        chunks: vec![whole(&norm[0])],
    });
    let out_key = "output_layer.weight";
    if let Some((s, v)) = find_stage(out_key) {
        let out = need(parts(s, v, out_key, &mut used), out_key)?;
        // With tied embeddings the last stage keeps a copy for its own use; HF has no lm_head then.
        if !layout.tied {
            outs.push(vocab_out(&inputs, "lm_head.weight", &out, vocab)?);
        }
    } else if !layout.tied {
        return Err(bad("untied embeddings but no output_layer.weight on any stage").in_file(folder.name()));
    }
    // Everything in the checkpoint must have a place in the output.
    for r in &ranks {
        for (v, map) in r.chunks.iter().enumerate() {
            if let Some(k) = map.keys().find(|k| !used.contains_key(&(r.pp, v, (*k).clone()))) {
                return Err(bad(format!("tensor '{k}' has no Hugging Face equivalent for a {fam:?} model"))
                    .in_file(&inputs[r.input].name));
            }
        }
    }
    for (name, p) in &replicated {
        check_replicated(&inputs, name, p)?;
    }
    let mut groups = Vec::new();
    let mut items = Vec::new();
    for o in outs {
        let (name, t) = finish(o)?;
        let path = TensorPath::from_parts(&[name.as_str()]);
        add_group(&mut groups, group_of(&path), Some(t.nbytes()));
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
    let mut notes = selection_notes(&sel);
    notes.push(format!(
        "Megatron grid TP={tp} x PP={pp}{}, {fam:?} layout: {} layers, hidden {}, {} heads in {} groups of dim {}, ffn {}, vocab {} padded to {}{}{}",
        if chunks_per_stage > 1 { format!(" (virtual pipeline x{chunks_per_stage})") } else { String::new() },
        layout.num_layers,
        layout.hidden,
        layout.heads,
        layout.groups,
        layout.kv_channels,
        layout.ffn,
        vocab,
        layout.padded_vocab,
        if layout.tied { ", tied embeddings" } else { "" },
        if layout.qkv_bias { ", qkv bias" } else { "" },
    ));
    let args_text = match &args {
        Some(a) => format!("args: {}", a.summary()),
        None => "args: none in the checkpoint; layout inferred from tensor shapes and config.json".into(),
    };
    let planned = Planned { plan: Plan { tensors, notes }, format, inputs, groups };
    Ok((planned.checked(folder.name())?, args_text))
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

/// Splits each rank's fused QKV (`[groups_r][q heads, k, v][head_dim]` rows) into q, k and v.
fn split_qkv(
    inputs: &[Input],
    prefix: &str,
    what: &str,
    parts: &[StridedView],
    l: &Layout,
    hpg: u64,
    hd: u64,
) -> Result<Vec<Out>> {
    let tp = parts.len() as u64;
    let groups_r = l.groups / tp;
    let per_group = (hpg + 2) * hd;
    let mut q = Vec::new();
    let mut k = Vec::new();
    let mut v = Vec::new();
    let name = format!("{prefix}.qkv.{what}");
    for (r, p) in parts.iter().enumerate() {
        if p.shape.first() != Some(&(groups_r * per_group)) {
            return Err(ranks_disagree(
                &name,
                format!(
                    "rank {r} holds {:?} but {groups_r} groups x ({hpg} q + k + v) x {hd} rows were expected",
                    p.shape
                ),
            )
            .in_file(&inputs[p.input].name));
        }
        for lg in 0..groups_r {
            let g = r as u64 * groups_r + lg;
            let base = lg * per_group;
            let push = |dst: &mut Vec<Chunk>, from: u64, rows: u64, at: u64| -> Result<()> {
                let view = p.rows(&name, base + from, base + from + rows)?;
                let mut offsets = vec![0u64; view.shape.len()];
                offsets[0] = at;
                dst.push(Chunk { offsets, sizes: view.shape.clone(), view });
                Ok(())
            };
            push(&mut q, 0, hpg * hd, g * hpg * hd)?;
            push(&mut k, hpg * hd, hd, g * hd)?;
            push(&mut v, (hpg + 1) * hd, hd, g * hd)?;
        }
    }
    let rest: Vec<u64> = parts[0].shape[1..].to_vec();
    let dtype = parts[0].dtype;
    let mk = |proj: &str, rows: u64, chunks: Vec<Chunk>| {
        let mut shape = vec![rows];
        shape.extend(&rest);
        Out { name: format!("{prefix}.{proj}.{what}"), shape, dtype, chunks }
    };
    Ok(vec![mk("q_proj", l.heads * hd, q), mk("k_proj", l.groups * hd, k), mk("v_proj", l.groups * hd, v)])
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

/// gate_proj and up_proj, each the ranks' halves stacked on dim 0.
fn gate_up(prefix: &str, (gate, up): (Vec<StridedView>, Vec<StridedView>)) -> Vec<Out> {
    [("gate_proj", gate), ("up_proj", up)]
        .into_iter()
        .map(|(proj, parts)| {
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
            Out { name: format!("{prefix}.{proj}.weight"), shape, dtype, chunks }
        })
        .collect()
}

/// The layout from `args` (or tensor shapes), checked against the rank grid and the base config.
fn derive_layout(
    ranks: &[RankModel],
    args: Option<&Args>,
    base: Option<&BaseModel>,
    tp: u64,
    pp: u64,
    file: &str,
) -> Result<Layout> {
    let cfg = |k: &str| base.and_then(|b| b.int(k));
    let base_name = base.map(|b| b.folder.name()).unwrap_or("");
    let shape_of = |key: &str| -> Option<Vec<u64>> {
        ranks
            .iter()
            .filter(|r| r.tp == 0)
            .find_map(|r| r.chunks.iter().find_map(|m| m.get(key).map(|v| v.shape.clone())))
    };
    let mismatch = |what: &str, ckpt: u64, hf: u64| {
        Error::new(ErrorKind::Inconsistent(format!(
            "the checkpoint has {what} = {ckpt} but the base config.json says {hf}: is the base model the one this checkpoint was trained from?"
        )))
        .in_file(&format!("{base_name}/config.json"))
    };
    let hidden = args.and_then(|a| a.get("hidden_size")).or(cfg("hidden_size")).ok_or_else(|| bad("no hidden_size"))?;
    let heads = args
        .and_then(|a| a.get("num_attention_heads"))
        .or(cfg("num_attention_heads"))
        .ok_or_else(|| bad("no num_attention_heads"))?;
    let gqa = args.and_then(|a| a.flag("group_query_attention"));
    let groups = match (gqa, args.and_then(|a| a.get("num_query_groups"))) {
        (Some(false), _) => heads,
        (_, Some(g)) => g,
        _ => cfg("num_key_value_heads").unwrap_or(heads),
    };
    let kv_channels =
        args.and_then(|a| a.get("kv_channels")).or(cfg("head_dim")).or(hidden.checked_div(heads)).unwrap_or(0);
    let num_layers =
        args.and_then(|a| a.get("num_layers")).or(cfg("num_hidden_layers")).ok_or_else(|| bad("no num_layers"))?;
    let ffn = args
        .and_then(|a| a.get("ffn_hidden_size"))
        .or(cfg("intermediate_size"))
        .ok_or_else(|| bad("no ffn_hidden_size"))?;
    let emb_rows = shape_of("embedding.word_embeddings.weight").and_then(|s| s.first().copied()).unwrap_or(0);
    let padded_vocab = args.and_then(|a| a.get("padded_vocab_size")).unwrap_or(emb_rows * tp);
    let tied = match args.and_then(|a| a.flag("untie_embeddings_and_output_weights")) {
        Some(untie) => !untie,
        None => shape_of("output_layer.weight").is_none(),
    };
    let swiglu = match args.and_then(|a| a.flag("swiglu")) {
        Some(s) => s,
        None => {
            shape_of("decoder.layers.0.mlp.linear_fc1.weight").and_then(|s| s.first().copied()) == Some(2 * ffn / tp)
        }
    };
    let qkv_bias = match args.and_then(|a| a.flag("add_qkv_bias")) {
        Some(b) => b,
        None => shape_of("decoder.layers.0.self_attention.linear_qkv.bias").is_some(),
    };
    let qk_norm = shape_of("decoder.layers.0.self_attention.q_layernorm.weight").is_some();
    if let Some(a) = args {
        for (k, have) in [("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)] {
            if let Some(want) = a.get(k)
                && want != have
            {
                return Err(bad(format!("args say {k} = {want} but the folder holds a grid of {have}")).in_file(file));
            }
        }
    }
    if heads == 0 || groups == 0 || heads % groups != 0 || groups % tp != 0 || ffn % tp != 0 || kv_channels == 0 {
        return Err(
            bad(format!("inconsistent layout: {heads} heads, {groups} query groups, ffn {ffn}, TP {tp}")).in_file(file)
        );
    }
    for (what, ckpt, key) in [
        ("hidden_size", hidden, "hidden_size"),
        ("num_layers", num_layers, "num_hidden_layers"),
        ("num_attention_heads", heads, "num_attention_heads"),
        ("num_query_groups", groups, "num_key_value_heads"),
        ("ffn_hidden_size", ffn, "intermediate_size"),
    ] {
        if let Some(hf) = cfg(key)
            && hf != ckpt
        {
            return Err(mismatch(what, ckpt, hf));
        }
    }
    if let Some(hd) = cfg("head_dim")
        && hd != kv_channels
    {
        return Err(mismatch("kv_channels", kv_channels, hd));
    }
    if let Some(v) = cfg("vocab_size")
        && v > padded_vocab
    {
        return Err(mismatch("padded_vocab_size", padded_vocab, v));
    }
    if let Some(tie) = base.and_then(|b| b.flag("tie_word_embeddings"))
        && tie != tied
    {
        return Err(mismatch("tied embeddings", tied as u64, tie as u64));
    }
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
    })
}
