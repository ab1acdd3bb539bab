//! torch.distributed.checkpoint folders: `.metadata` plus `.distcp` files of chunk items.
//!
//! The `.metadata` pickle maps every global tensor to its chunks (offsets and sizes in the global tensor)
//! and every chunk to a byte range of a `.distcp` file, which holds a complete torch.save zip of exactly
//! the chunk's elements. Planning reads only the metadata and the small zip headers of the chunks it
//! needs; tensor bytes are gathered band by band at write time. Chunks must tile each tensor exactly.

use crate::convert::EXPANSION_ALLOWANCE;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result, tensor_err};
use crate::io::{ByteCursor, Folder, Input, SharedInput};
use crate::pickle::{self, Heap, Id, Limits, Node};
use crate::plan::{Chunk, ChunkedTensor, StridedView};
use crate::select::TensorPath;
use crate::torch::TorchFile;
use std::collections::HashMap;
use std::rc::Rc;

mod zstd;
use zstd::DecodeBudget;

/// One tensor of a DCP checkpoint, as the metadata describes it.
#[derive(Debug, Clone)]
pub struct DcpTensor {
    /// Flattened key, e.g. `fsdp_checkpoint.model.lm_head.weight`.
    pub fqn: String,
    /// Its key path (from `planner_data` when present).
    pub path: TensorPath,
    /// Element type.
    pub dtype: DType,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Where each chunk lives.
    pub chunks: Vec<DcpChunk>,
}

impl DcpTensor {
    /// Size in bytes.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size() as u64
    }
}

/// One chunk: its box in the global tensor and its item in a `.distcp` file.
#[derive(Debug, Clone)]
pub struct DcpChunk {
    /// Start of the box in each dimension.
    pub offsets: Vec<u64>,
    /// Extent of the box in each dimension.
    pub sizes: Vec<u64>,
    /// The `.distcp` file, relative to the DCP folder.
    pub file: String,
    /// Byte offset of the item in that file.
    pub offset: u64,
    /// Byte length of the item.
    pub length: u64,
    /// Transforms applied to the item (e.g. `stream.zstd/1`).
    pub transforms: Vec<String>,
}

/// The parsed `.metadata` of a DCP folder.
#[derive(Debug, Clone, Default)]
pub struct DcpMetadata {
    /// Tensor entries in metadata order.
    pub tensors: Vec<DcpTensor>,
    /// Keys of non-tensor (bytes) entries: lr schedulers, RNG state, scalars.
    pub bytes_items: Vec<String>,
}

fn meta_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::NotCheckpoint(format!("bad DCP .metadata: {}", msg.into())))
}

/// Field `name` of a pickled dataclass (dict state) or of a plain dict.
fn field(h: &Heap, id: Id, name: &str) -> Option<Id> {
    h.dict_get(id, name)
}

fn u64_seq(h: &Heap, id: Id) -> Option<Vec<u64>> {
    h.as_seq(id)?.iter().map(|&v| h.as_int(v).and_then(|x| u64::try_from(x).ok())).collect()
}

fn key_text(h: &Heap, id: Id) -> String {
    match h.get(id) {
        Node::Str(s) => s.clone(),
        Node::Int(i) => i.to_string(),
        _ => h.describe(id),
    }
}

/// dtype of a `TensorProperties` (tuple state in torch >= 2.1, dict state before).
fn properties_dtype(h: &Heap, props: Id) -> Option<DType> {
    let dtype_id = match h.get(props) {
        Node::Object { state: Some(s), .. } => match h.get(*s) {
            Node::Tuple(items) => items.first().copied(),
            Node::Dict(_) => h.dict_get(*s, "dtype"),
            _ => None,
        },
        _ => None,
    }?;
    match h.get(dtype_id) {
        Node::Global { module, name } if module == "torch" => DType::from_torch_name(name),
        _ => None,
    }
}

/// Reads `rel` (a `.metadata` file) inside `folder`; `dir` is the DCP folder's path relative to `folder`.
pub fn read_metadata(folder: &dyn Folder, dir: &str) -> Result<DcpMetadata> {
    let rel = join(dir, ".metadata");
    let input = folder.open(&rel)?;
    let mut cur = ByteCursor::new(&input, 0, input.len())?;
    let (h, root) = pickle::parse(&mut cur, Limits::default())?;
    parse_metadata(&h, root).map_err(|e| e.in_file(&input.name))
}

fn parse_metadata(h: &Heap, root: Id) -> Result<DcpMetadata> {
    let sdm = field(h, root, "state_dict_metadata").ok_or_else(|| meta_err("no state_dict_metadata"))?;
    let Node::Dict(entries) = h.get(sdm) else { return Err(meta_err("state_dict_metadata is not a dict")) };
    let storage = field(h, root, "storage_data").ok_or_else(|| meta_err("no storage_data"))?;
    let Node::Dict(storage) = h.get(storage) else { return Err(meta_err("storage_data is not a dict")) };
    // (fqn, chunk offsets) -> storage info id
    let mut where_: HashMap<(String, Vec<u64>), Id> = HashMap::new();
    for &(k, v) in storage {
        let Some(fqn) = field(h, k, "fqn").and_then(|f| h.as_str(f)) else { continue };
        let offsets = match field(h, k, "offset") {
            Some(o) => u64_seq(h, o).unwrap_or_default(),
            None => Vec::new(),
        };
        where_.insert((fqn.to_string(), offsets), v);
    }
    let planner: HashMap<&str, Vec<String>> = match field(h, root, "planner_data").map(|p| h.get(p)) {
        Some(Node::Dict(items)) => items
            .iter()
            .filter_map(|&(k, v)| Some((h.as_str(k)?, h.as_seq(v)?.iter().map(|&p| key_text(h, p)).collect())))
            .collect(),
        _ => HashMap::new(),
    };
    let mut meta = DcpMetadata::default();
    for &(k, v) in entries {
        let fqn = h.as_str(k).ok_or_else(|| meta_err("a state_dict_metadata key is not a string"))?.to_string();
        let class = match h.get(v) {
            Node::Object { callable, .. } => h.global_name(*callable).unwrap_or_default(),
            _ => String::new(),
        };
        if class.ends_with("BytesStorageMetadata") {
            meta.bytes_items.push(fqn);
            continue;
        }
        if !class.ends_with("TensorStorageMetadata") {
            return Err(meta_err(format!("entry '{fqn}' is a {} (expected tensor or bytes metadata)", h.describe(v))));
        }
        let props = field(h, v, "properties").ok_or_else(|| meta_err(format!("'{fqn}' has no properties")))?;
        let dtype = properties_dtype(h, props)
            .ok_or_else(|| tensor_err(&fqn, "dtype is missing or has no safetensors equivalent"))?;
        let shape = field(h, v, "size")
            .and_then(|s| u64_seq(h, s))
            .ok_or_else(|| meta_err(format!("'{fqn}' has no valid size")))?;
        let chunk_ids = field(h, v, "chunks")
            .and_then(|c| h.as_seq(c).map(<[Id]>::to_vec))
            .ok_or_else(|| meta_err(format!("'{fqn}' has no chunk list")))?;
        let mut chunks = Vec::with_capacity(chunk_ids.len());
        for c in chunk_ids {
            let offsets = field(h, c, "offsets").and_then(|o| u64_seq(h, o));
            let sizes = field(h, c, "sizes").and_then(|o| u64_seq(h, o));
            let (Some(offsets), Some(sizes)) = (offsets, sizes) else {
                return Err(meta_err(format!("a chunk of '{fqn}' lacks offsets or sizes")));
            };
            let info = *where_
                .get(&(fqn.clone(), offsets.clone()))
                .ok_or_else(|| meta_err(format!("no storage entry for chunk {offsets:?} of '{fqn}'")))?;
            let file = field(h, info, "relative_path").and_then(|p| h.as_str(p)).map(str::to_string);
            let offset = field(h, info, "offset").and_then(|p| h.as_int(p)).and_then(|x| u64::try_from(x).ok());
            let length = field(h, info, "length").and_then(|p| h.as_int(p)).and_then(|x| u64::try_from(x).ok());
            let (Some(file), Some(offset), Some(length)) = (file, offset, length) else {
                return Err(meta_err(format!("storage entry of '{fqn}' lacks relative_path/offset/length")));
            };
            let transforms = match field(h, info, "transform_descriptors").map(|t| h.get(t)) {
                Some(Node::List(v) | Node::Tuple(v)) => v.iter().map(|&t| key_text(h, t)).collect(),
                _ => Vec::new(),
            };
            chunks.push(DcpChunk { offsets, sizes, file, offset, length, transforms });
        }
        let path = match planner.get(fqn.as_str()) {
            Some(parts) if !parts.is_empty() => TensorPath::from_parts(parts),
            _ => TensorPath::from_parts(&fqn.split('.').collect::<Vec<_>>()),
        };
        meta.tensors.push(DcpTensor { fqn, path, dtype, shape, chunks });
    }
    Ok(meta)
}

/// `dir/name`, or `name` when `dir` is empty.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
}

/// Checks that the chunks tile the tensor exactly: inside its bounds, no overlap, no gap.
pub fn check_tiling(t: &DcpTensor) -> Result<()> {
    let boxes: Vec<(&[u64], &[u64])> = t.chunks.iter().map(|c| (c.offsets.as_slice(), c.sizes.as_slice())).collect();
    crate::plan::check_tiling(&t.fqn, &t.shape, &boxes)
}

/// Opens the inputs a set of tensors needs and turns each into a chunked source.
pub struct ChunkResolver<'f> {
    folder: &'f dyn Folder,
    dir: String,
    /// Inputs the plan reads (`.distcp` files and decompressed items), by the indices its views use.
    pub inputs: Vec<Input>,
    files: HashMap<String, (usize, Rc<Input>)>,
    safetensors: HashMap<(usize, u64), Rc<SafetensorsBlob>>,
    /// Decoded zstd items by (file index, offset, length): the input index of each, so that tensors naming the
    /// same item share one decode.
    zstd: HashMap<(usize, u64, u64), usize>,
    /// What the zstd items may still decode to, together (as much as a plan may hold).
    zstd_budget: DecodeBudget,
}

/// The header of a safetensors blob inside a `.distcp` (DCP's `SerializationFormat.SAFETENSORS`).
struct SafetensorsBlob {
    data_start: u64,
    entries: serde_json::Map<String, serde_json::Value>,
}

/// Largest safetensors header accepted inside a DCP file.
const MAX_ST_HEADER: u64 = 100 << 20;

impl<'f> ChunkResolver<'f> {
    /// A resolver for the DCP folder `dir` inside `folder`.
    pub fn new(folder: &'f dyn Folder, dir: &str) -> Self {
        ChunkResolver {
            folder,
            dir: dir.to_string(),
            inputs: Vec::new(),
            files: HashMap::new(),
            safetensors: HashMap::new(),
            zstd: HashMap::new(),
            zstd_budget: DecodeBudget::new(EXPANSION_ALLOWANCE),
        }
    }

    /// How many `.distcp` files the resolved tensors read.
    pub fn files_used(&self) -> usize {
        self.files.len()
    }

    fn file(&mut self, file: &str) -> Result<(usize, Rc<Input>)> {
        if let Some(f) = self.files.get(file) {
            return Ok(f.clone());
        }
        if file.contains("..") || file.starts_with('/') {
            return Err(meta_err(format!("item path '{file}' leaves the checkpoint folder")));
        }
        let input = Rc::new(self.folder.open(&join(&self.dir, file))?);
        self.inputs.push(Input::new(input.name.clone(), Box::new(SharedInput(input.clone()))));
        let entry = (self.inputs.len() - 1, input);
        self.files.insert(file.to_string(), entry.clone());
        Ok(entry)
    }

    /// Validates the tiling and locates every non-empty chunk's bytes.
    pub fn resolve(&mut self, t: &DcpTensor) -> Result<ChunkedTensor> {
        check_tiling(t)?;
        let mut chunks = Vec::new();
        for c in &t.chunks {
            if c.sizes.contains(&0) {
                continue;
            }
            let (idx, file) = self.file(&c.file)?;
            let view = match c.transforms.as_slice() {
                [] => self.plain_item(idx, &file, c, t)?,
                [z] if z.starts_with("stream.zstd") => {
                    let zi = match self.zstd.get(&(idx, c.offset, c.length)) {
                        Some(&zi) => zi,
                        None => {
                            let item = self.zstd_budget.open(file.clone(), c.offset, c.length)?;
                            let name = format!("{} (zstd item at byte {})", file.name, c.offset);
                            self.inputs.push(Input::new(name, Box::new(item)));
                            self.zstd.insert((idx, c.offset, c.length), self.inputs.len() - 1);
                            self.inputs.len() - 1
                        }
                    };
                    item_view(&self.inputs[zi], zi, 0, self.inputs[zi].len(), c, t)?
                }
                other => {
                    return Err(Error::new(ErrorKind::Unsupported(format!(
                        "chunk {:?} of '{}' is stored with transforms {other:?} (only stream.zstd is supported)",
                        c.offsets, t.fqn
                    )))
                    .in_file(&file.name));
                }
            };
            chunks.push(Chunk { offsets: c.offsets.clone(), sizes: c.sizes.clone(), view });
        }
        ChunkedTensor::new(&t.fqn, t.shape.clone(), t.dtype, chunks)
    }

    /// An uncompressed item: a torch.save zip, or a tensor of a safetensors blob (sniffed, since the
    /// metadata does not say which serialization wrote the folder).
    fn plain_item(&mut self, idx: usize, file: &Rc<Input>, c: &DcpChunk, t: &DcpTensor) -> Result<StridedView> {
        let mut head = [0u8; 9];
        file.read_exact_at(c.offset, &mut head)?;
        if head.starts_with(b"PK") {
            return item_view(&self.inputs[idx], idx, c.offset, c.length, c, t);
        }
        let blob = match self.safetensors.get(&(idx, c.offset)) {
            Some(b) => b.clone(),
            None => {
                let b = Rc::new(read_safetensors_blob(file, c.offset)?);
                self.safetensors.insert((idx, c.offset), b.clone());
                b
            }
        };
        let e = blob.entries.get(&t.fqn).ok_or_else(|| {
            tensor_err(&t.fqn, format!("not in the safetensors blob at byte {}", c.offset)).in_file(&file.name)
        })?;
        let dtype = e["dtype"].as_str().and_then(DType::from_safetensors_name);
        let shape: Option<Vec<u64>> = e["shape"].as_array().map(|a| a.iter().filter_map(|v| v.as_u64()).collect());
        let offs: Option<Vec<u64>> =
            e["data_offsets"].as_array().map(|a| a.iter().filter_map(|v| v.as_u64()).collect());
        let (Some(dtype), Some(shape), Some([a, b])) = (dtype, shape, offs.as_deref()) else {
            return Err(tensor_err(&t.fqn, "malformed safetensors header entry").in_file(&file.name));
        };
        if dtype != t.dtype || shape != c.sizes {
            return Err(tensor_err(
                &t.fqn,
                format!(
                    "safetensors entry is {} {shape:?}, the metadata says {} {:?}",
                    dtype.torch_name(),
                    t.dtype.torch_name(),
                    c.sizes
                ),
            )
            .in_file(&file.name));
        }
        let start = blob.data_start.checked_add(*a).ok_or_else(|| tensor_err(&t.fqn, "offset overflows"))?;
        let strides = contiguous_strides(&shape);
        let nbytes = b.checked_sub(*a).ok_or_else(|| tensor_err(&t.fqn, "inverted data offsets"))?;
        if start.checked_add(nbytes).is_none_or(|e| e > file.len()) {
            return Err(Error::new(ErrorKind::Truncated(format!("tensor '{}' runs past the end of the file", t.fqn)))
                .in_file(&file.name));
        }
        StridedView::new(&t.fqn, idx, start, nbytes, dtype, 0, shape, strides, 64).map_err(|e| e.in_file(&file.name))
    }
}

fn contiguous_strides(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1].saturating_mul(shape[d + 1]);
    }
    s
}

fn read_safetensors_blob(file: &Input, at: u64) -> Result<SafetensorsBlob> {
    let mut n = [0u8; 8];
    file.read_exact_at(at, &mut n)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_ST_HEADER {
        return Err(
            Error::new(ErrorKind::Limit(format!("safetensors header of {n} bytes at byte {at}"))).in_file(&file.name)
        );
    }
    let header = file.read_vec(at + 8, n)?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| {
        Error::new(ErrorKind::NotCheckpoint(format!(
            "item at byte {at} is neither a torch.save zip nor safetensors: {e}"
        )))
        .in_file(&file.name)
    })?;
    let serde_json::Value::Object(entries) = v else {
        return Err(Error::new(ErrorKind::NotCheckpoint(format!("safetensors header at byte {at} is not an object")))
            .in_file(&file.name));
    };
    Ok(SafetensorsBlob { data_start: at + 8 + n, entries })
}

/// The view of the one tensor stored in a chunk item: a torch.save zip at `[base, base + len)` of `input`.
fn item_view(input: &Input, idx: usize, base: u64, len: u64, c: &DcpChunk, t: &DcpTensor) -> Result<StridedView> {
    let fqn = &t.fqn;
    let file = TorchFile::open_zip_range(input, base, len)?;
    let found = file.tensors(input, idx)?;
    let [one] = found.as_slice() else {
        return Err(tensor_err(fqn, format!("chunk item at byte {base} holds {} tensors, expected 1", found.len()))
            .in_file(&input.name));
    };
    let v = &one.view;
    if v.shape != c.sizes {
        return Err(tensor_err(fqn, format!("chunk item has shape {:?} but the metadata says {:?}", v.shape, c.sizes))
            .in_file(&input.name));
    }
    if v.dtype != t.dtype {
        return Err(tensor_err(
            fqn,
            format!("chunk item is {} but the metadata says {}", v.dtype.torch_name(), t.dtype.torch_name()),
        )
        .in_file(&input.name));
    }
    Ok(v.clone())
}
