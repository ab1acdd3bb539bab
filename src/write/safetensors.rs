//! The safetensors writer: one `model.safetensors`, or shards plus `model.safetensors.index.json`.
//!
//! Every header, file size and the index are computed from the plan before any tensor byte is read.
//! Inside a file, tensors are ordered by descending element size, then by name (as the safetensors
//! library does); headers carry `__metadata__ {"format":"pt"}` and are padded with spaces to 8 bytes.

use super::Sink;
use super::puller::{OnePlan, OutputFile, Segment};
use crate::error::{Error, ErrorKind, Result};
use crate::io::Input;
use crate::plan::Plan;
use std::collections::BTreeMap;

/// One file of a safetensors layout, with its exact size.
#[derive(Debug, Clone)]
pub struct LayoutFile {
    /// File name inside the output folder.
    pub name: String,
    /// Exact size in bytes.
    pub size: u64,
    content: Content,
}

#[derive(Debug, Clone)]
enum Content {
    /// A safetensors file: its header (length prefix included) and plan indices in data order.
    Tensors { header: Vec<u8>, order: Vec<usize> },
    /// A small file written as is (the index).
    Bytes(Vec<u8>),
}

/// Every file a conversion will write, in writing order.
#[derive(Debug, Clone)]
pub struct OutputLayout {
    /// The files; the index, when present, is last.
    pub files: Vec<LayoutFile>,
}

impl OutputLayout {
    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Name of the index file of a sharded output.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// Parses sizes like `5GB` (10^9), `500MiB` (2^20), `1000` (bytes), as `save_pretrained` does.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        other => {
            return Err(format!("unknown size unit '{other}' in '{s}' (use B, KB, MB, GB, KiB, MiB, GiB)"));
        }
    };
    let v: f64 = num.parse().map_err(|_| format!("'{s}' is not a size such as 5GB"))?;
    let bytes = v * mult as f64;
    if !(1.0..1e19).contains(&bytes) {
        return Err(format!("size '{s}' is out of range"));
    }
    Ok(bytes as u64)
}

fn header_entry(plan: &Plan, i: usize, begin: u64) -> String {
    let t = &plan.tensors[i];
    let end = begin + t.nbytes();
    let name = serde_json::Value::String(t.name.clone()).to_string();
    let shape = t.shape.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    format!(
        "{name}:{{\"dtype\":\"{}\",\"shape\":[{shape}],\"data_offsets\":[{begin},{end}]}}",
        t.dtype.safetensors_name()
    )
}

fn build_file(plan: &Plan, mut members: Vec<usize>, name: String) -> LayoutFile {
    members.sort_by(|&a, &b| {
        let (ta, tb) = (&plan.tensors[a], &plan.tensors[b]);
        tb.dtype.size().cmp(&ta.dtype.size()).then_with(|| ta.name.cmp(&tb.name))
    });
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut at = 0u64;
    for &i in &members {
        json.push(',');
        json.push_str(&header_entry(plan, i, at));
        at += plan.tensors[i].nbytes();
    }
    json.push('}');
    let pad = (8 - json.len() % 8) % 8;
    json.extend(std::iter::repeat_n(' ', pad));
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(json.as_bytes());
    let size = header.len() as u64 + at;
    LayoutFile { name, size, content: Content::Tensors { header, order: members } }
}

/// Splits the plan into files: one when `max_shard` is `None` or everything fits, shards otherwise.
/// A shard's size (header included) stays within `max_shard` unless one tensor alone is larger.
pub fn layout(plan: &Plan, max_shard: Option<u64>) -> Result<OutputLayout> {
    if plan.tensors.is_empty() {
        return Err(Error::new(ErrorKind::NoTensors("the plan is empty".into())));
    }
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0u64;
    // Base header: length prefix, metadata, braces, and up to 7 bytes of padding.
    let base = 8 + 40 + 7;
    for (i, t) in plan.tensors.iter().enumerate() {
        // An upper bound of the header entry: offsets written with the most digits they can have.
        let entry = header_entry(plan, i, u64::MAX / 2).len() as u64 + 1;
        let cost = t.nbytes() + entry;
        let current = groups.last_mut().ok_or_else(|| Error::new(ErrorKind::Output("no shard".into())))?;
        if let Some(max) = max_shard
            && !current.is_empty()
            && base + used + cost > max
        {
            groups.push(vec![i]);
            used = cost;
        } else {
            current.push(i);
            used += cost;
        }
    }
    let n = groups.len();
    if n == 1 {
        let members = groups.pop().unwrap_or_default();
        return Ok(OutputLayout { files: vec![build_file(plan, members, "model.safetensors".into())] });
    }
    let mut files = Vec::with_capacity(n + 1);
    let mut weight_map = BTreeMap::new();
    for (k, members) in groups.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        for &i in &members {
            weight_map.insert(plan.tensors[i].name.clone(), serde_json::Value::String(name.clone()));
        }
        files.push(build_file(plan, members, name));
    }
    let index = serde_json::json!({
        "metadata": {"total_size": plan.total_bytes()},
        "weight_map": weight_map,
    });
    let mut bytes =
        serde_json::to_vec_pretty(&index).map_err(|e| Error::new(ErrorKind::Output(format!("index: {e}"))))?;
    bytes.push(b'\n');
    files.push(LayoutFile { name: INDEX_NAME.into(), size: bytes.len() as u64, content: Content::Bytes(bytes) });
    Ok(OutputLayout { files })
}

/// The subfolder of a LoRA adapter export: PEFT's layout, one `adapter_model.safetensors` beside its config.
pub const ADAPTER_DIR: &str = "lora_adapter";
/// The adapter export's tensors.
pub const ADAPTER_MODEL: &str = "lora_adapter/adapter_model.safetensors";
/// The adapter export's config file, written after the tensors.
pub const ADAPTER_CONFIG: &str = "lora_adapter/adapter_config.json";

/// Makes `layout` a PEFT adapter's: its one file becomes `lora_adapter/adapter_model.safetensors` (PEFT loads no
/// sharded adapter, so a layout of several files is refused).
pub fn as_adapter(layout: &mut OutputLayout) -> Result<()> {
    match layout.files.as_mut_slice() {
        [only] => {
            only.name = ADAPTER_MODEL.into();
            Ok(())
        }
        _ => Err(Error::new(ErrorKind::Unsupported("a sharded LoRA adapter (drop --max-shard-size)".into()))),
    }
}

impl OutputLayout {
    /// The layout's files as output files of plan `plan` of an output set: each safetensors file is its header
    /// bytes then its tensors' data; the index is bytes.
    pub fn into_files(self, plan: usize) -> Vec<OutputFile> {
        self.files
            .into_iter()
            .map(|f| {
                let segments = match f.content {
                    Content::Tensors { header, order } => {
                        vec![Segment::Bytes(header), Segment::Tensors { plan, order }]
                    }
                    Content::Bytes(b) => vec![Segment::Bytes(b)],
                };
                OutputFile { name: f.name, size: f.size, segments }
            })
            .collect()
    }
}

/// Streams every file of `layout` into `sink` through the one puller (the caller commits once every output file
/// is written). `progress` gets the tensor bytes written so far.
pub fn write(
    plan: &Plan,
    layout: &OutputLayout,
    inputs: &[Input],
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let files = layout.clone().into_files(0);
    super::puller::drive(&OnePlan { files, plan, inputs }, sink, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::plan::{PlannedTensor, Source, StridedView};
    use crate::write::MemorySink;

    fn plan_of(storage_len: u64, specs: &[(&str, DType, Vec<u64>)]) -> Plan {
        let tensors = specs
            .iter()
            .map(|(name, dt, shape)| {
                let strides = {
                    let mut s = vec![1u64; shape.len()];
                    for d in (0..shape.len().saturating_sub(1)).rev() {
                        s[d] = s[d + 1] * shape[d + 1];
                    }
                    s
                };
                let v = StridedView::new(name, 0, 0, storage_len, *dt, 0, shape.clone(), strides, 64).unwrap();
                PlannedTensor::from_source(name.to_string(), shape.clone(), Source::View(v), None)
            })
            .collect();
        Plan { tensors, notes: vec![] }
    }

    #[test]
    fn an_adapter_layout_is_one_file_in_peft_place() {
        let plan = plan_of(4096, &[("a", DType::F32, vec![100]), ("b", DType::F32, vec![100])]);
        let mut one = layout(&plan, None).unwrap();
        as_adapter(&mut one).unwrap();
        assert_eq!(one.files[0].name, "lora_adapter/adapter_model.safetensors");
        let mut sharded = layout(&plan, Some(500)).unwrap();
        assert!(sharded.files.len() > 1);
        let err = as_adapter(&mut sharded).unwrap_err();
        assert_eq!(err.label(), "unsupported", "{err}");
    }

    #[test]
    fn single_file_layout_is_valid_safetensors() {
        let data: Vec<u8> = (0..64).collect();
        let inputs = vec![Input::new("mem", Box::new(data.clone()))];
        let plan = plan_of(64, &[("b", DType::U8, vec![3]), ("a", DType::F32, vec![2, 2])]);
        let layout = layout(&plan, None).unwrap();
        let mut sink = MemorySink::default();
        write(&plan, &layout, &inputs, &mut sink, &mut |_| {}).unwrap();
        sink.commit().unwrap();
        let f = &sink.files["model.safetensors"];
        assert_eq!(f.len() as u64, layout.files[0].size);
        let n = u64::from_le_bytes(f[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0);
        let header: serde_json::Value = serde_json::from_slice(&f[8..8 + n]).unwrap();
        assert_eq!(header["__metadata__"]["format"], "pt");
        // f32 first (wider), then u8.
        assert_eq!(header["a"]["data_offsets"], serde_json::json!([0, 16]));
        assert_eq!(header["b"]["data_offsets"], serde_json::json!([16, 19]));
        assert_eq!(&f[8 + n..8 + n + 16], &data[..16]);
        assert_eq!(&f[8 + n + 16..], &data[..3]);
    }

    #[test]
    fn shards_respect_the_limit_and_index_totals() {
        let data = vec![7u8; 4096];
        let inputs = vec![Input::new("mem", Box::new(data))];
        let specs: Vec<(String, DType, Vec<u64>)> = (0..10).map(|i| (format!("t{i}"), DType::F32, vec![100])).collect();
        let specs: Vec<(&str, DType, Vec<u64>)> = specs.iter().map(|(n, d, s)| (n.as_str(), *d, s.clone())).collect();
        let plan = plan_of(4096, &specs);
        let layout = layout(&plan, Some(1000)).unwrap();
        assert!(layout.files.len() > 3);
        let mut sink = MemorySink::default();
        write(&plan, &layout, &inputs, &mut sink, &mut |_| {}).unwrap();
        sink.commit().unwrap();
        for f in &layout.files[..layout.files.len() - 1] {
            assert!(f.size <= 1000, "{} is {} bytes", f.name, f.size);
        }
        let index: serde_json::Value = serde_json::from_slice(&sink.files[INDEX_NAME]).unwrap();
        assert_eq!(index["metadata"]["total_size"], 4000);
        assert_eq!(index["weight_map"].as_object().unwrap().len(), 10);
    }

    #[test]
    fn sizes_parse_like_hf() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("20KB").unwrap(), 20_000);
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
    }
}
