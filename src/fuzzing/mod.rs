//! Entry points shared by the `cargo fuzz` targets (fuzz/) and the replay tests (tests/fuzz_replay.rs): each
//! takes arbitrary bytes, must never panic, hang or allocate without bound, and may only return errors.
#![allow(missing_docs)]

mod classifier;
pub use classifier::pickle_policy;

use crate::io::{Input, MemoryFolder};
use crate::planned::PlanOptions;

fn input(data: &[u8], name: &str) -> Input {
    Input::new(name, Box::new(data.to_vec()))
}

/// The pickle VM on a raw stream.
pub fn pickle(data: &[u8]) {
    let i = input(data, "fuzz.pkl");
    if let Ok(mut cur) = crate::io::ByteCursor::new(&i, 0, i.len()) {
        let _ = crate::pickle::parse(&mut cur, crate::pickle::Limits::default());
    }
}

/// The torch.save reader (zip and legacy), then a plan and the first bands of every tensor.
pub fn torch_file(data: &[u8]) {
    let Ok(planned) = crate::torch::plan(input(data, "fuzz.pt"), &PlanOptions::default()) else {
        return;
    };
    read_some(&planned.plan, &planned.inputs);
}

/// Reads the first band of each planned tensor, as a writer would (a band is at most 16 MiB).
fn read_some(plan: &crate::plan::Plan, inputs: &[Input]) {
    let mut bufs = crate::plan::BandBuffers::default();
    let mut out = Vec::new();
    for t in &plan.tensors {
        let n = t.numel().min(t.band_elems());
        out.resize((n * t.dtype.size() as u64) as usize, 0);
        let _ = t.read_band(inputs, 0, n, &mut out, &mut bufs);
    }
}

/// A DCP `.metadata` file (with an empty data file beside it).
pub fn dcp_metadata(data: &[u8]) {
    let mut f = MemoryFolder { name: "fuzz_dcp".into(), ..Default::default() };
    f.files.insert(".metadata".into(), data.to_vec());
    f.files.insert("__0_0.distcp".into(), Vec::new());
    if let Ok(p) = crate::dcp::plan(&f, "", &PlanOptions::default()) {
        read_some(&p.plan, &p.inputs);
    }
}

/// Splits `data` after its first four bytes into the part they count (a little-endian u32, capped at what is
/// there) and the rest; None when there are not four bytes.
fn split_counted(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    Some(rest.split_at((u32::from_le_bytes(*len) as usize).min(rest.len())))
}

/// A whole DCP folder of two ranks: its `.metadata`, `__0_0.distcp` and `__1_0.distcp` (so the items themselves:
/// torch zips, safetensors blobs, zstd streams). The input is the metadata's u32 length and bytes, then rank 0's
/// file's u32 length and bytes, then rank 1's bytes.
pub fn dcp_folder(data: &[u8]) {
    let Some((meta, rest)) = split_counted(data) else { return };
    let Some((rank0, rank1)) = split_counted(rest) else { return };
    let mut f = MemoryFolder { name: "fuzz_dcp".into(), ..Default::default() };
    f.files.insert(".metadata".into(), meta.to_vec());
    f.files.insert("__0_0.distcp".into(), rank0.to_vec());
    f.files.insert("__1_0.distcp".into(), rank1.to_vec());
    if let Ok(p) = crate::dcp::plan(&f, "", &PlanOptions::default()) {
        read_some(&p.plan, &p.inputs);
    }
}

/// A Megatron iteration folder of two rank files, against a fixed base config. The input is a little-endian
/// u32 length of rank 0's file, then rank 0's bytes, then rank 1's.
pub fn megatron(data: &[u8]) {
    let Some((a, b)) = split_counted(data) else { return };
    let mut f = MemoryFolder { name: "fuzz_mg".into(), ..Default::default() };
    f.files.insert("mp_rank_00/model_optim_rng.pt".into(), a.to_vec());
    f.files.insert("mp_rank_01/model_optim_rng.pt".into(), b.to_vec());
    let mut base = MemoryFolder { name: "fuzz_base".into(), ..Default::default() };
    base.files.insert(
        "config.json".into(),
        br#"{"model_type":"qwen2","hidden_size":32,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":64,"vocab_size":128,"tie_word_embeddings":false}"#.to_vec(),
    );
    let Ok(base) = crate::hf::BaseModel::open(&base) else { return };
    if let Ok((p, _)) = crate::megatron::plan_megatron(&f, "", Some(&base), &PlanOptions::default()) {
        read_some(&p.plan, &p.inputs);
    }
}

/// Two expert-parallel rank files of a Mixture-of-Experts checkpoint (`mp_rank_00_000`, `mp_rank_00_001`; rank 0's
/// length first, as [`megatron`]), merged against a Qwen3-MoE base config shaped like the `qwen3moe_ep2` fixture.
pub fn megatron_moe(data: &[u8]) {
    if let Some(p) = megatron_moe_plan(data) {
        read_some(&p.plan, &p.inputs);
    }
}

/// [`megatron_moe`]'s plan, when the bytes make one.
fn megatron_moe_plan(data: &[u8]) -> Option<crate::planned::Planned> {
    let (a, b) = split_counted(data)?;
    let mut f = MemoryFolder { name: "fuzz_mg_moe".into(), ..Default::default() };
    f.files.insert("mp_rank_00_000/model_optim_rng.pt".into(), a.to_vec());
    f.files.insert("mp_rank_00_001/model_optim_rng.pt".into(), b.to_vec());
    let mut base = MemoryFolder { name: "fuzz_base".into(), ..Default::default() };
    base.files.insert(
        "config.json".into(),
        br#"{"model_type":"qwen3_moe","hidden_size":32,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"intermediate_size":64,"vocab_size":64,"num_experts":4,"num_experts_per_tok":2,"moe_intermediate_size":16,"norm_topk_prob":true,"tie_word_embeddings":false}"#.to_vec(),
    );
    let base = crate::hf::BaseModel::open(&base).ok()?;
    crate::megatron::plan_megatron(&f, "", Some(&base), &PlanOptions::default()).ok().map(|(p, _)| p)
}

/// The files of a Megatron torch_dist iteration folder saved by two tensor-parallel ranks with two writer threads
/// each (no base model, so nothing about the layout is known beforehand): `.metadata`, `common.pt`,
/// `__0_0.distcp`, `__0_1.distcp` and `__1_0.distcp`, each as a u32 length and bytes, then `__1_1.distcp`.
pub fn megatron_dist(data: &[u8]) {
    let mut f = MemoryFolder { name: "fuzz_mg_dist".into(), ..Default::default() };
    let mut rest = data;
    for name in [".metadata", "common.pt", "__0_0.distcp", "__0_1.distcp", "__1_0.distcp"] {
        let Some((part, more)) = split_counted(rest) else { return };
        f.files.insert(name.into(), part.to_vec());
        rest = more;
    }
    f.files.insert("__1_1.distcp".into(), rest.to_vec());
    if let Ok((p, _)) = crate::megatron::plan_megatron(&f, "", None, &PlanOptions::default()) {
        read_some(&p.plan, &p.inputs);
    }
}

/// The safetensors header reader used by `verify`, base-model checks and DCP's safetensors items (the
/// latter read from a byte offset given by the input's first byte).
pub fn safetensors_header(data: &[u8]) {
    let input = input(data, "fuzz.safetensors");
    let _ = crate::safetensors_header::read_file(&input);
    let _ = crate::safetensors_header::read_item(&input, data.first().map_or(0, |&b| u64::from(b)));
}

#[cfg(test)]
mod tests {
    /// The entry point's folder and base config fit the real fixture, so the fuzzer starts from a full MoE merge.
    #[test]
    fn the_moe_entry_point_merges_the_real_fixture() -> std::io::Result<()> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/megatron_moe/qwen3moe_ep2/actor/iter_0000001");
        let a = std::fs::read(format!("{dir}/mp_rank_00_000/model_optim_rng.pt"))?;
        let b = std::fs::read(format!("{dir}/mp_rank_00_001/model_optim_rng.pt"))?;
        let mut data = (a.len() as u32).to_le_bytes().to_vec();
        data.extend(a);
        data.extend(b);
        let p = super::megatron_moe_plan(&data);
        assert_eq!(p.map(|p| p.plan.tensors.len()), Some(45));
        Ok(())
    }
}
