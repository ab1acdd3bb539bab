//! Megatron-LM checkpoints, merged into a Hugging Face state dict of one of the families in `family.rs`
//! (Qwen2, Qwen3, Llama/Mistral, Phi-3). This module finds and reads them: legacy
//! `iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt`, one file per tensor- and pipeline-parallel rank, and
//! (`dist.rs`) torch_dist folders, rebuilt into the same ranks. `layout.rs` reads the hyperparameters from the
//! pickled `args` Namespace (or, without it, from tensor shapes and the base `config.json`) and cross-checks them
//! against the base config; `merge.rs` is the one merge path, driven by the family table: every output is a view
//! over the rank files.

use crate::error::{Error, ErrorKind, Result};
use crate::hf::BaseModel;
use crate::io::join;
use crate::io::{Folder, Input};
use crate::pickle::{Heap, Id, Node};
use crate::plan::StridedView;
use crate::planned::{PlanOptions, Planned};
use crate::torch::TorchFile;
use merge::Checkpoint;
use std::collections::{BTreeMap, HashSet};

mod dist;
mod family;
mod layout;
mod merge;

pub use dist::is_dist;
pub use layout::Layout;

const RANK_FILE: &str = "model_optim_rng.pt";
/// Key endings under which torch_dist's separately stored SwiGLU halves stand in for a rank's fc1 (dense MLP,
/// shared experts and experts alike; no Megatron name ends this way, so they cannot clash with a real key).
const FC1_GATE: &str = "linear_fc1.gate";
const FC1_UP: &str = "linear_fc1.up";

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Inconsistent(msg.into()))
}

fn show(v: Option<u64>) -> String {
    v.map_or("absent".into(), |v| v.to_string())
}

/// Parses `mp_rank_TT[_PPP][_EEE]` into its one to three numbers; which of PP and EP a two-number name holds is
/// for `args` to say (see [`RankNums::place`]).
fn parse_rank_dir(name: &str) -> Option<std::result::Result<RankNums, String>> {
    let rest = name.strip_prefix("mp_rank_")?;
    let nums: Option<Vec<u64>> = rest.split('_').map(|s| s.parse::<u64>().ok()).collect();
    Some(match nums {
        Some(n) if (1..=3).contains(&n.len()) => Ok(RankNums(n)),
        _ => Err(format!("bad rank folder {name}")),
    })
}

/// The numbers of a rank folder's name: `[tp]`, `[tp, pp or ep]` or `[tp, pp, ep]`.
#[derive(Debug, Clone)]
struct RankNums(Vec<u64>);

impl RankNums {
    /// `(tp, pp, ep)`: megatron names a folder `mp_rank_TT`, then `_PPP` only when PP > 1, then `_EEE` only when
    /// EP > 1, so a second number is an EP rank when `args` say EP > 1 and PP = 1, and a PP rank otherwise.
    fn place(&self, pp: u64, ep: u64) -> (u64, u64, u64) {
        match self.0.as_slice() {
            [t] => (*t, 0, 0),
            [t, e] if ep > 1 && pp <= 1 => (*t, 0, *e),
            [t, p] => (*t, *p, 0),
            [t, p, e, ..] => (*t, *p, *e),
            [] => (0, 0, 0),
        }
    }
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

/// What `args` says, field by field (`None` where absent). Two ranks' args are equal when the fields are.
#[derive(Debug, Clone, Default)]
struct Args {
    fields: BTreeMap<&'static str, Option<u64>>,
    /// What the pickled `args` value is (`<argparse.Namespace object>`, `7`, `<dict of 3>`), for messages.
    what: String,
}

impl PartialEq for Args {
    fn eq(&self, other: &Args) -> bool {
        self.fields == other.fields
    }
}

const INT_ARGS: &[&str] = &[
    "num_experts",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
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
const BOOL_ARGS: &[&str] = &[
    "swiglu",
    "add_qkv_bias",
    "untie_embeddings_and_output_weights",
    "group_query_attention",
    "qk_layernorm",
    "moe_router_pre_softmax",
    "moe_shared_expert_gate",
    "multi_latent_attention",
    "rotary_interleaved",
];

fn read_args(h: &Heap, ns: Id) -> Args {
    let mut fields = BTreeMap::new();
    for k in INT_ARGS {
        fields.insert(*k, ns_int(h, ns, k));
    }
    for k in BOOL_ARGS {
        fields.insert(*k, ns_bool(h, ns, k).map(u64::from));
    }
    Args { fields, what: h.describe(ns) }
}

impl Args {
    fn get(&self, k: &str) -> Option<u64> {
        self.fields.get(k).copied().flatten()
    }
    fn flag(&self, k: &str) -> Option<bool> {
        self.get(k).map(|v| v != 0)
    }
    /// Whether no field ckptconv reads is there (`args` that are not an argparse Namespace, say).
    fn is_empty(&self) -> bool {
        self.fields.values().all(Option::is_none)
    }
    /// A printable summary for `inspect`.
    fn summary(&self) -> String {
        if self.is_empty() {
            return format!(
                "{} (none of the fields read; layout inferred from tensor shapes and config.json)",
                self.what
            );
        }
        self.fields.iter().filter_map(|(k, v)| v.map(|v| format!("{k}={v}"))).collect::<Vec<_>>().join(" ")
    }
}

/// One rank's model tensors, by local name, per virtual-pipeline chunk.
struct RankModel {
    tp: u64,
    pp: u64,
    /// Expert-parallel rank (0 without expert parallelism, and for torch_dist, whose experts are global).
    ep: u64,
    input: usize,
    chunks: Vec<BTreeMap<String, StridedView>>,
    args: Option<Args>,
}

fn load_rank(folder: &dyn Folder, rel: &str, (tp, pp, ep): (u64, u64, u64), idx: usize) -> Result<(Input, RankModel)> {
    let mut input = folder.open(rel)?;
    let file = TorchFile::open(&mut input)?;
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
    Ok((input, RankModel { tp, pp, ep, input: idx, chunks, args }))
}

/// Plans the Megatron checkpoint at `dir` inside `folder`, as the HF model of `base`.
pub fn plan_megatron(
    folder: &dyn Folder,
    dir: &str,
    base: Option<&BaseModel>,
    opts: &PlanOptions,
) -> Result<(Planned, String)> {
    let ck = if is_dist(&folder.files(), dir) {
        let d = dist::load_dist(folder, dir)?;
        let format = format!("Megatron-LM torch_dist checkpoint ({} .distcp file(s) used)", d.files);
        let args_file = d.args_file;
        let grid = (d.tp, d.pp, 1);
        Checkpoint { inputs: d.inputs, ranks: d.ranks, args: d.args, args_file, grid, stages: 1, format }
    } else {
        load_rank_files(folder, dir)?
    };
    merge::plan_ranks(folder, ck, base, opts)
}

/// The `mp_rank_*/model_optim_rng.pt` files under `dir` as (numbers of the folder name, path), sorted by path.
fn rank_files(folder: &dyn Folder, dir: &str) -> Result<Vec<(RankNums, String)>> {
    let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    let mut grid = Vec::new();
    for f in folder.files() {
        let Some((d, file)) = f.strip_prefix(&prefix).and_then(|r| r.split_once('/')) else { continue };
        if file != RANK_FILE {
            continue;
        }
        if let Some(parsed) = parse_rank_dir(d) {
            let nums = parsed.map_err(|m| bad(m).in_file(folder.name()))?;
            grid.push((nums, f.clone()));
        }
    }
    grid.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(grid)
}

/// Reads every rank file of the legacy checkpoint at `dir`, checking that the grid is complete and that the
/// ranks agree about `args`.
fn load_rank_files(folder: &dyn Folder, dir: &str) -> Result<Checkpoint> {
    let found = rank_files(folder, dir)?;
    // The first rank's args say how big the grid should be (and whether `mp_rank_TT_NNN` counts PP or EP ranks),
    // so a missing last rank is named as such.
    let Some((nums0, rel0)) = found.first() else {
        return Err(bad(format!("no mp_rank_* folders in {dir}")).in_file(folder.name()));
    };
    let (input0, mut rank0) = load_rank(folder, rel0, nums0.place(1, 1), 0)?;
    let arg = |k: &str| rank0.args.as_ref().and_then(|a| a.get(k)).unwrap_or(0).min(4096);
    let (pp_arg, ep_arg) = (arg("pipeline_model_parallel_size"), arg("expert_model_parallel_size"));
    if nums0.0.len() == 2 && pp_arg > 1 && ep_arg > 1 {
        let msg = format!("args say PP = {pp_arg} and EP = {ep_arg}, but rank folders have two numbers, not three");
        return Err(bad(msg).in_file(&input0.name));
    }
    let mut grid: Vec<((u64, u64, u64), String)> =
        found.iter().map(|(n, rel)| (n.place(pp_arg, ep_arg), rel.clone())).collect();
    grid.sort_by_key(|g| (g.0.1, g.0.2, g.0.0));
    let dims = |f: fn(&(u64, u64, u64)) -> u64| grid.iter().map(|g| f(&g.0)).max().map_or(0, |m| m + 1);
    let tp = dims(|g| g.0).max(arg("tensor_model_parallel_size"));
    let pp = dims(|g| g.1).max(pp_arg);
    let ep = dims(|g| g.2).max(ep_arg);
    if tp == 0 || tp * pp * ep > 4096 {
        return Err(bad(format!("no usable mp_rank_* grid in {dir}")).in_file(folder.name()));
    }
    // With expert TP 1 under a larger TP, megatron saves one folder per rank that is dense- or expert-data-parallel
    // rank 0, so not every (TP, EP) pair has a folder (FORMATS.md §3a).
    let sparse = ep > 1 && tp > 1 && arg("expert_tensor_parallel_size") == 1;
    check_grid_complete(folder, dir, &grid, (tp, pp, ep), sparse)?;
    // Complete, so the grid's first entry, (0, 0, 0), is the rank already read.
    (rank0.tp, rank0.pp, rank0.ep) = (0, 0, 0);
    if grid.first().is_none_or(|g| g.1 != *rel0) {
        return Err(bad(format!("{rel0} is not rank (0, 0, 0) of the grid")).in_file(folder.name()));
    }
    let mut inputs = vec![input0];
    let mut ranks = vec![rank0];
    for (at, rel) in grid.iter().skip(1) {
        let (input, m) = load_rank(folder, rel, *at, inputs.len())?;
        inputs.push(input);
        ranks.push(m);
    }
    let args = agreed_args(&inputs, &ranks)?;
    let format = format!("Megatron-LM checkpoint ({} rank files)", inputs.len());
    // The ranks agree on args, so rank 0's file stands for them.
    let args_file = inputs.first().map(|i| i.name.clone()).unwrap_or_default();
    Ok(Checkpoint { inputs, ranks, args, args_file, grid: (tp, pp, ep), stages: pp, format })
}

/// Every (tp, pp, ep) of the grid has its rank file.
fn check_grid_complete(
    folder: &dyn Folder,
    dir: &str,
    grid: &[((u64, u64, u64), String)],
    (tp, pp, ep): (u64, u64, u64),
    sparse: bool,
) -> Result<()> {
    let mut have = HashSet::new();
    for (at, rel) in grid {
        if !have.insert(*at) {
            let msg = format!("two rank folders hold rank (TP, PP, EP) = {at:?}; {rel} is one of them");
            return Err(bad(msg).in_file(folder.name()));
        }
    }
    if sparse {
        // Every TP rank (dense tensors) and every EP rank (experts) of each stage needs one folder of its own.
        let tps: HashSet<(u64, u64)> = have.iter().map(|h| (h.0, h.1)).collect();
        let eps: HashSet<(u64, u64)> = have.iter().map(|h| (h.2, h.1)).collect();
        for s in 0..pp {
            let missing = (0..tp).find(|&t| !tps.contains(&(t, s))).map(|t| ("tensor-parallel", t));
            let missing = missing.or_else(|| (0..ep).find(|&e| !eps.contains(&(e, s))).map(|e| ("expert-parallel", e)));
            if let Some((what, which)) = missing {
                let msg = format!(
                    "no rank folder holds {what} rank {which} of stage {s} (a {tp}x{pp}x{ep} TP x PP x EP grid with \
                     expert TP 1, where each TP rank and each EP rank needs one folder)"
                );
                return Err(bad(msg).in_file(folder.name()));
            }
        }
        return Ok(());
    }
    let multi_pp = pp > 1 || grid.iter().any(|g| g.1.contains(&format!("mp_rank_{:02}_", g.0.0)));
    let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    for s in 0..pp {
        for e in 0..ep {
            for t in 0..tp {
                if have.contains(&(t, s, e)) {
                    continue;
                }
                let mut want = format!("mp_rank_{t:02}");
                if multi_pp && (pp > 1 || ep == 1) {
                    want += &format!("_{s:03}");
                }
                if ep > 1 {
                    want += &format!("_{e:03}");
                }
                let msg =
                    format!("the rank grid is {tp}x{pp}x{ep} (TP x PP x EP) but {prefix}{want}/{RANK_FILE} is missing");
                return Err(bad(msg).in_file(folder.name()));
            }
        }
    }
    Ok(())
}

/// The ranks' `args`, which must agree (every field read is global).
fn agreed_args(inputs: &[Input], ranks: &[RankModel]) -> Result<Option<Args>> {
    let args = ranks.first().and_then(|r| r.args.clone());
    for r in ranks.iter().skip(1) {
        if r.args == args {
            continue;
        }
        let diff = match (&args, &r.args) {
            (Some(a), Some(b)) => a
                .fields
                .iter()
                .filter(|(k, v)| b.fields.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}: {} on rank 0, {} here", show(*v), show(b.fields.get(k).copied().flatten())))
                .collect::<Vec<_>>()
                .join(", "),
            _ => "args present on one rank only".into(),
        };
        return Err(bad(format!("args differ from rank 0's ({diff})")).in_file(&inputs[r.input].name));
    }
    Ok(args)
}
