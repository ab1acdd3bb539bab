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

/// `scan` of one file: the torch reader, then the sweep over every zip entry, stacked pickles and .npy payloads,
/// and the JSON report.
pub fn scan(data: &[u8]) {
    if let Ok(report) = crate::scan::scan(input(data, "fuzz.pt")) {
        let _ = report.to_json();
    }
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

/// A Hugging Face set of two safetensors shards and their index (the index's u32 length and bytes, shard 1's, then
/// shard 2), converted with `--dtype bf16` through the whole pipeline: the index checks, FP8 dequantization with a
/// config declaring 64x64 blocks, tied copies against that config.
pub fn hf_set(data: &[u8]) {
    if let Some(c) = hf_set_conversion(data) {
        read_some(c.plan(), c.inputs_for_fuzzing());
    }
}

fn hf_set_conversion(data: &[u8]) -> Option<crate::conversion::Conversion> {
    let (index, rest) = split_counted(data)?;
    let (a, b) = split_counted(rest)?;
    let mut f = MemoryFolder { name: "fuzz_hf".into(), ..Default::default() };
    f.files.insert("model.safetensors.index.json".into(), index.to_vec());
    f.files.insert("model-00001-of-00002.safetensors".into(), a.to_vec());
    f.files.insert("model-00002-of-00002.safetensors".into(), b.to_vec());
    f.files.insert(
        "config.json".into(),
        br#"{"tie_word_embeddings":true,"torch_dtype":"float32","quantization_config":{"quant_method":"fp8","weight_block_size":[64,64]}}"#.to_vec(),
    );
    let opts = crate::conversion::ConversionOptions {
        plan: PlanOptions { dtype: Some(crate::dtype::DType::BF16), ..Default::default() },
        ..Default::default()
    };
    crate::conversion::Conversion::new(crate::conversion::Checkpoint::Folder(&f), None, &opts).ok()
}

/// A DeepSpeed ZeRO tag folder of three ranks (the committed fixture's grid): the model states (u32 length and
/// bytes; every rank's file gets them), ranks 0 and 1's optimizer partitions (the same), then rank 2's. Named as
/// stage 3 names them, plus stage 1/2's single model-states file.
pub fn zero(data: &[u8]) {
    let Some((m, rest)) = split_counted(data) else { return };
    let Some((o0, rest)) = split_counted(rest) else { return };
    let Some((o1, o2)) = split_counted(rest) else { return };
    let mut f = MemoryFolder { name: "fuzz_zero".into(), ..Default::default() };
    f.files.insert("mp_rank_00_model_states.pt".into(), m.to_vec());
    for (r, o) in [o0, o1, o2].into_iter().enumerate() {
        f.files.insert(format!("zero_pp_rank_{r}_mp_rank_00_model_states.pt"), m.to_vec());
        f.files.insert(format!("bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), o.to_vec());
    }
    if let Ok(p) = crate::deepspeed::plan(&f, "", &PlanOptions::default()) {
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
    fn counted(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut data = Vec::new();
        for p in &parts[..parts.len() - 1] {
            data.extend((p.len() as u32).to_le_bytes());
            data.extend(p);
        }
        data.extend(&parts[parts.len() - 1]);
        data
    }

    /// The ZeRO entry point's folder fits the committed ZeRO-3 fixture, so the fuzzer starts from a full gather.
    #[test]
    fn the_zero_entry_point_gathers_the_real_fixture() -> std::io::Result<()> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/deepspeed/zero3_bf16_w3/ckpt/global_step2");
        let mut parts = vec![std::fs::read(format!("{dir}/zero_pp_rank_0_mp_rank_00_model_states.pt"))?];
        for r in 0..3 {
            parts.push(std::fs::read(format!("{dir}/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))?);
        }
        let data = counted(&parts);
        let (m, rest) = super::split_counted(&data).unwrap();
        assert_eq!(m.len(), parts[0].len());
        assert!(rest.len() > parts[1].len());
        // Every rank's model states are rank 0's here, so rank 0's frozen fragment stands for every rank's: the
        // gather still runs (the fragments are padded pieces of the same size).
        let mut f = crate::io::MemoryFolder { name: "z".into(), ..Default::default() };
        f.files.insert("zero_pp_rank_0_mp_rank_00_model_states.pt".into(), parts[0].clone());
        for r in 0..3 {
            f.files.insert(format!("zero_pp_rank_{r}_mp_rank_00_model_states.pt"), parts[0].clone());
            f.files.insert(format!("bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), parts[r + 1].clone());
        }
        let p = crate::deepspeed::plan(&f, "", &crate::planned::PlanOptions::default());
        assert_eq!(p.map(|p| p.plan.tensors.len()).ok(), Some(29));
        Ok(())
    }

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
