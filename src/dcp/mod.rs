//! torch.distributed.checkpoint folders: `.metadata` plus `.distcp` files of chunk items.
//!
//! The `.metadata` pickle maps every global tensor to its chunks (offsets and sizes in the global tensor)
//! and every chunk to a byte range of a `.distcp` file, which holds a complete torch.save zip of exactly
//! the chunk's elements. Planning reads only the metadata and the small zip headers of the chunks it
//! needs; tensor bytes are gathered band by band at write time. Chunks must tile each tensor exactly.

use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result, tensor_err};
use crate::io::{ByteCursor, Folder, Input, SharedInput, join};
use crate::pickle::{self, Heap, Id, Limits, Node};
use crate::plan::{Chunk, ChunkedTensor, Plan, PlannedTensor, Source, StridedView};
use crate::planned::{EXPANSION_ALLOWANCE, GroupCounter, InputKind, PlanOptions, Planned, group_of, selection_notes};
use crate::safetensors_header::{self, Header};
use crate::select::{self, TensorPath};
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
    /// Size in bytes; an error when the metadata's shape multiplies past u64.
    pub fn nbytes(&self) -> Result<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size() as u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| tensor_err(&self.fqn, format!("shape {:?} overflows: more than 2^64 bytes", self.shape)))
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
    /// Globals off the allowlist that the metadata pickle names without calling them.
    pub named_globals: Vec<crate::error::GlobalUse>,
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
    let (h, root) = pickle::parse_all(&mut cur, Limits::default())?;
    let mut meta = parse_metadata(&h, root).map_err(|e| e.in_file(&input.name))?;
    meta.named_globals = h.named_globals;
    Ok(meta)
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
    /// Headers of the safetensors items read so far (DCP's `SerializationFormat.SAFETENSORS`), by (file index, offset).
    safetensors: HashMap<(usize, u64), Rc<Header>>,
    /// Decoded zstd items by (file index, offset, length): the input index of each, so that tensors naming the
    /// same item share one decode.
    zstd: HashMap<(usize, u64, u64), usize>,
    /// What the zstd items may still decode to, together (as much as a plan may hold).
    zstd_budget: DecodeBudget,
}

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
                let b = Rc::new(safetensors_header::read_item(file, c.offset)?);
                self.safetensors.insert((idx, c.offset), b.clone());
                b
            }
        };
        // The reader checked every entry: a known dtype, offsets contiguous and inside the file.
        let e = blob.tensors.get(&t.fqn).ok_or_else(|| {
            tensor_err(&t.fqn, format!("not in the safetensors item at byte {}", c.offset)).in_file(&file.name)
        })?;
        if e.dtype != t.dtype || e.shape != c.sizes {
            return Err(tensor_err(
                &t.fqn,
                format!(
                    "safetensors entry is {} {:?}, the metadata says {} {:?}",
                    e.dtype.torch_name(),
                    e.shape,
                    t.dtype.torch_name(),
                    c.sizes
                ),
            )
            .in_file(&file.name));
        }
        let [a, b] = e.offsets;
        let start = blob.data_start.checked_add(a).ok_or_else(|| tensor_err(&t.fqn, "offset overflows"))?;
        StridedView::whole(&t.fqn, idx, start, b - a, e.dtype, e.shape.clone()).map_err(|e| e.in_file(&file.name))
    }
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

/// Plans the conversion of a DCP folder at `dir` inside `folder`.
pub fn plan(folder: &dyn Folder, dir: &str, opts: &PlanOptions) -> Result<Planned> {
    let meta = read_metadata(folder, dir)?;
    let meta_name = format!("{}/{}", folder.name(), join(dir, ".metadata"));
    let mut groups = GroupCounter::default();
    for t in &meta.tensors {
        groups.add(group_of(&t.path), Some(t.nbytes().map_err(|e| e.in_file(&meta_name))?));
    }
    for b in &meta.bytes_items {
        groups.add(group_of(&TensorPath::from_parts(&b.split('.').collect::<Vec<_>>())), None);
    }
    if meta.tensors.is_empty() {
        return Err(Error::new(ErrorKind::NoTensors("the DCP metadata lists no tensors".into())).in_file(&meta_name));
    }
    let items = meta.tensors.iter().map(|t| (t.path.clone(), t)).collect();
    let (kept, sel) = select::select(items, &opts.prefix).map_err(|e| e.in_file(&meta_name))?;
    let mut resolver = ChunkResolver::new(folder, dir);
    let mut tensors = Vec::with_capacity(kept.len());
    for (name, t) in kept {
        let chunked = resolver.resolve(t).map_err(|e| e.in_file(&meta_name))?;
        tensors.push(PlannedTensor::from_source(name, t.shape.clone(), Source::Chunked(chunked), opts.dtype));
    }
    let files = resolver.files_used();
    let mut notes = selection_notes(&sel);
    notes.extend(crate::planned::named_globals_note(&meta.named_globals));
    Planned {
        kind: InputKind::Dcp,
        plan: Plan { tensors, notes },
        format: format!("torch.distributed.checkpoint folder ({files} .distcp file(s) used)"),
        inputs: resolver.inputs,
        groups: groups.into_groups(),
    }
    .checked(&meta_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbytes_of_a_shape_past_u64_is_an_error_not_a_wrap() {
        let t = |shape: Vec<u64>| DcpTensor {
            fqn: "optim.state.w.exp_avg".into(),
            path: TensorPath::from_parts(&["optim", "state", "w", "exp_avg"]),
            dtype: DType::F32,
            shape,
            chunks: Vec::new(),
        };
        assert_eq!(t(vec![6, 4]).nbytes().unwrap(), 96);
        assert_eq!(t(vec![]).nbytes().unwrap(), 4);
        // 2^40 * 2^40 elements wrap to 0 in u64; 2^62 elements of 4 bytes wrap to 0 too.
        for shape in [vec![1 << 40, 1 << 40], vec![1 << 62]] {
            let e = t(shape).nbytes().unwrap_err();
            assert_eq!(e.label(), "tensor");
            assert!(e.to_string().contains("optim.state.w.exp_avg") && e.to_string().contains("overflows"), "{e}");
        }
    }
}
