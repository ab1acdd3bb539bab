//! torch.save files: the zip format (torch >= 1.6) and the legacy pickle-sequence format.
//!
//! Opening a file runs the pickle VM over its object pickle, then resolves every tensor's storage to a
//! byte range of the file. Tensor data is never read here: the result is a list of [`StridedView`]s
//! named by their dotted path in the pickled object.

pub mod inflate;
pub mod zip;

use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result, tensor_err};
use crate::io::{ByteCursor, Input, ReadAt};
use crate::pickle::{self, Heap, Id, Limits, Node, TensorNode};
use crate::plan::{Plan, PlannedTensor, Source, StridedView};
use crate::planned::{GroupCounter, InputKind, PlanOptions, Planned, group_of, selection_notes};
use crate::select::{self, TensorPath};
use inflate::{EntryReader, Inflated, SharedEntry};
use std::collections::HashMap;
use std::rc::Rc;
use zip::{ZipEntry, ZipIndex};

/// Which torch.save layout a file uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TorchFormat {
    /// A zip archive (torch >= 1.6) with entries under `root/`.
    Zip {
        /// The archive's top folder name.
        root: String,
    },
    /// The pre-1.6 sequence of pickles followed by raw storages.
    Legacy,
}

impl std::fmt::Display for TorchFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TorchFormat::Zip { root } => write!(f, "torch.save zip (archive '{root}/')"),
            TorchFormat::Legacy => write!(f, "torch.save legacy (pre-1.6 format)"),
        }
    }
}

/// A tensor found in the pickled object.
#[derive(Debug, Clone)]
pub struct FoundTensor {
    /// Path of keys and indices from the root object.
    pub path: TensorPath,
    /// Where its bytes are (for a DTensor: this rank's local shard).
    pub view: StridedView,
    /// Set when the value is a DTensor shard (verl's per-rank FSDP files).
    pub dtensor: Option<DTensorMeta>,
}

/// How a DTensor's local shard sits in the global tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DTensorMeta {
    /// Global shape.
    pub global_shape: Vec<u64>,
    /// One placement per mesh dimension.
    pub placements: Vec<Placement>,
    /// This rank's coordinate on each mesh dimension.
    pub coords: Vec<u64>,
}

/// A DTensor placement on one mesh dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Split along this tensor dimension (torch.chunk sizes).
    Shard(u64),
    /// A full copy on every rank of the mesh dimension.
    Replicate,
    /// Anything else (`Partial`, `_StridedShard`), by class name.
    Other(String),
}

enum Leaf<'a> {
    Tensor(&'a TensorNode),
    /// `(local tensor, meta)` of a DTensor.
    DTensor(&'a TensorNode, DTensorMeta),
}

/// A parsed torch.save file: its object graph and where each storage's bytes are.
pub struct TorchFile {
    /// The layout.
    pub format: TorchFormat,
    /// The object graph.
    pub heap: Heap,
    /// The root object.
    pub root: Id,
    storages: Storages,
}

enum Storages {
    /// Zip: `root/data/<key>` entries, located lazily.
    Zip { index: ZipIndex, root: String },
    /// Legacy: storage key -> (data start, bytes).
    Legacy(HashMap<String, (u64, u64)>),
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// 0x1950a86a20f9469cfc6c, the legacy format's magic number, as pickled little-endian bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// Most dimensions a tensor may claim.
const MAX_DIMS: usize = 64;
/// Most nesting levels walked when looking for tensors.
const MAX_WALK_DEPTH: usize = 256;
/// Most containers and values visited when looking for tensors (bounds billion-laughs graphs).
const MAX_WALK_VISITS: u64 = 20_000_000;
/// Most paths through which one container may be reached. Real checkpoints share tensors (tied weights), not
/// containers; a list reached through thousands of paths is a self-multiplying graph, refused early.
const MAX_CONTAINER_PATHS: u32 = 1000;

/// What a walk has visited so far.
#[derive(Default)]
struct WalkBudget {
    total: u64,
    containers: HashMap<Id, u32>,
}
/// Most tensors one file may name (the largest public models have about 100,000; each costs a few hundred bytes of plan).
pub const MAX_TENSORS: usize = 400_000;
/// Most bytes of tensor names in one file.
const MAX_NAME_BYTES: usize = 64 << 20;

/// Whether `head` (the first bytes of a file) looks like a torch.save file: torch.load's own test for a zip
/// (the local-header magic at offset 0), else a pickle. torch.load hands anything that is not a zip to the
/// unpickler, so a protocol 0 or 1 pickle (no PROTO opcode: it starts with `c`, `(`, `]`, ...) counts too: it
/// would run under torch.load, and the reader must say what it calls.
pub fn sniff(head: &[u8]) -> bool {
    head.starts_with(ZIP_MAGIC) || head.first().is_some_and(|&b| pickle::can_start(b))
}

impl TorchFile {
    /// Parses the metadata of a torch.save file, deciding its layout as `torch.load` does (see
    /// [`refuse_tar`](Self::refuse_tar)): a zip when it starts with a zip local header (`_is_zipfile`), else the
    /// legacy pickles; a file that a tar reader would open as well is refused, since `torch.load` tries the
    /// pre-0.4 tar layout before the legacy pickles. A zip end record elsewhere in the file does not make it a zip
    /// here, as it does not for torch (but a zip appended to a pickle is refused as bytes after its end). A zip
    /// with deflated entries gets `input`'s reader replaced by one that also reads their inflated bytes
    /// ([`inflate::Inflated`]), where the storages' views then point.
    pub fn open(input: &mut Input) -> Result<TorchFile> {
        let mut head = [0u8; 4];
        let n = input.len().min(4) as usize;
        input.read_exact_at(0, &mut head[..n])?;
        let head = &head[..n];
        if head.is_empty() {
            return Err(Error::new(ErrorKind::NotCheckpoint("the file is empty".into())).in_file(&input.name));
        }
        if !sniff(head) {
            return Err(Error::new(ErrorKind::NotCheckpoint(format!(
                "starts with bytes {}; expected a zip local header (torch >= 1.6) or a pickle (legacy torch.save)",
                head.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
            )))
            .in_file(&input.name));
        }
        Self::refuse_tar(input)?;
        if !head.starts_with(ZIP_MAGIC) {
            return Self::open_pickle(input);
        }
        let mut index = ZipIndex::read_range(input, 0, input.len())?;
        let (deflated, total) = index.place_deflated(input.len()).map_err(|e| e.in_file(&input.name))?;
        let raw = if deflated.is_empty() {
            None
        } else {
            let raw: Rc<dyn ReadAt> = Rc::from(std::mem::replace(&mut input.data, Box::new(Vec::new())));
            input.data = Box::new(Inflated::new(&input.name, raw.clone(), deflated, total));
            Some(raw)
        };
        Self::from_index(input, index, raw)
    }

    /// Refuses a file whose first 512 bytes are a tar header with a valid checksum. `torch.load` of a file on disk
    /// that is not a zip first tries `tarfile.open(f, 'r:')` (the pre-0.4 layout), which opens any such file;
    /// only when that fails does it read the legacy pickles. torch.save never writes one, so a file that is both
    /// is a polyglot whose tar reading this tool would never see.
    fn refuse_tar(input: &Input) -> Result<()> {
        if input.len() < 512 {
            return Ok(());
        }
        let mut block = [0u8; 512];
        input.read_exact_at(0, &mut block)?;
        if !is_tar_header(&block) {
            return Ok(());
        }
        Err(Error::new(ErrorKind::Unsupported(
            "the file is also a tar archive (its first 512 bytes are a tar header with a valid checksum); torch.load \
             would read it as one (the pre-0.4 tar layout), not as what ckptconv reads"
                .into(),
        ))
        .in_file(&input.name))
    }

    /// Parses a torch.save zip stored at `[base, base + len)` of `input` (a DCP item). torch's DCP writer stores its
    /// entries, so deflated ones are refused here.
    pub fn open_zip_range(input: &Input, base: u64, len: u64) -> Result<TorchFile> {
        let mut magic = [0u8; 4];
        if len >= 4 {
            input.read_exact_at(base, &mut magic)?;
        }
        if magic != ZIP_MAGIC {
            return Err(Error::new(ErrorKind::NotCheckpoint(format!(
                "the bytes at {base} do not start with a zip local header, so torch.load would not read them as a \
                 zip"
            )))
            .in_file(&input.name));
        }
        Self::from_index(input, ZipIndex::read_range(input, base, len)?, None)
    }

    /// Reads the archive's byte order and object pickle; `raw` is the file's own bytes when its deflated entries
    /// are inflated. The entries are found as torch's reader finds them: the archive folder is the first entry's
    /// top folder, every entry must be in it, records are `<folder>/<name>`, and a `constants.pkl` record makes it
    /// TorchScript.
    fn from_index(input: &Input, index: ZipIndex, raw: Option<Rc<dyn ReadAt>>) -> Result<TorchFile> {
        let zerr = |msg: String| Error::new(ErrorKind::Zip(msg)).in_file(&input.name);
        let first = index.names().next().unwrap_or("");
        let Some((root, _)) = first.split_once('/') else {
            return Err(zerr(format!(
                "the first entry '{first}' is not in a folder; torch.load refuses such archives (\"file in archive \
                 is not in a subdirectory\")"
            )));
        };
        let root = root.to_string();
        let prefix = format!("{root}/");
        if let Some(stray) = index.names().find(|n| !n.starts_with(&prefix)) {
            return Err(zerr(format!(
                "entry '{stray}' is outside the archive folder '{prefix}'; torch.load refuses such archives"
            )));
        }
        if let Some(ts) = index.locate(input, &format!("{prefix}constants.pkl"))? {
            return Err(Error::new(ErrorKind::Unsupported(format!(
                "the archive holds '{}', so torch.load reads it as a TorchScript archive (torch.jit.load), not as \
                 the data.pkl that ckptconv reads",
                ts.name
            )))
            .in_file(&input.name));
        }
        let pkl_name = format!("{prefix}data.pkl");
        let Some(pkl) = index.locate(input, &pkl_name)? else {
            return Err(Error::new(ErrorKind::NotCheckpoint(format!(
                "a zip without a '{pkl_name}' entry (the data.pkl of its archive folder), so not a torch.save archive"
            )))
            .in_file(&input.name));
        };
        if let Some(bo) = index.locate(input, &format!("{prefix}byteorder"))? {
            let text = if bo.is_deflated() {
                let reader = entry_reader(input, raw.as_ref(), &bo)?;
                let mut text = vec![0u8; bo.size.min(16) as usize];
                reader.read(0, &mut text)?;
                reader.verify()?;
                text
            } else {
                input.read_vec(bo.data_start, bo.size.min(16))?
            };
            if text != b"little" {
                return Err(Error::new(ErrorKind::Unsupported(format!(
                    "byte order '{}'; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(&text)
                )))
                .in_file(&input.name));
            }
        }
        // The pickle must fill its entry: bytes after its STOP are read by nobody (pickle::parse_all).
        let (heap, root_id) = if pkl.is_deflated() {
            // Streamed from the inflater (never whole in memory); its offsets are the entry's, and so its name says.
            let reader = Rc::new(entry_reader(input, raw.as_ref(), &pkl)?);
            let mut entry = Input::new(
                format!("{} (inflated entry '{}')", input.name, pkl.name),
                Box::new(SharedEntry(reader.clone())),
            );
            entry.allowed_globals = input.allowed_globals.clone();
            entry.global_log = input.global_log.clone();
            let mut cur = ByteCursor::new(&entry, 0, pkl.size)?;
            let parsed = pickle::parse_all(&mut cur, Limits::default())?;
            reader.verify()?;
            parsed
        } else {
            let mut cur = ByteCursor::new(input, pkl.data_start, pkl.data_start + pkl.size)?;
            pickle::parse_all(&mut cur, Limits::default())?
        };
        Ok(TorchFile {
            format: TorchFormat::Zip { root: root.clone() },
            heap,
            root: root_id,
            storages: Storages::Zip { index, root: prefix },
        })
    }

    fn open_pickle(input: &Input) -> Result<TorchFile> {
        let mut cur = ByteCursor::new(input, 0, input.len())?;
        match Self::read_pickles(input, &mut cur) {
            Err(e) if matches!(e.kind(), ErrorKind::UnsafeGlobal { .. }) => Err(Self::later_refusals(e, &mut cur)),
            other => other,
        }
    }

    /// After a refused pickle of the legacy format's five, the ones after it: torch.load runs them in turn when
    /// the first returns what it expects (a "magic number" made by `eval` leads to a `system` in the object
    /// pickle), so the refusal names their calls too. Stops at the first pickle that does not read to its STOP.
    fn later_refusals(first: Error, cur: &mut ByteCursor<'_>) -> Error {
        let ErrorKind::UnsafeGlobal { calls, named } = first.kind() else { return first };
        let (mut calls, mut named) = (calls.clone(), named.clone());
        for _ in 0..4 {
            match pickle::parse(cur, Limits::default()) {
                Ok(_) => {}
                Err(e) => {
                    let ErrorKind::UnsafeGlobal { calls: c, named: n } = e.kind() else { break };
                    for u in c {
                        if !calls.iter().any(|x| x.global == u.global) {
                            calls.push(u.clone());
                        }
                    }
                    for u in n {
                        if !named.iter().chain(&calls).any(|x| x.global == u.global) {
                            named.push(u.clone());
                        }
                    }
                }
            }
        }
        named.retain(|u| !calls.iter().any(|c| c.global == u.global));
        let file = first.file().unwrap_or_default().to_string();
        Error::new(ErrorKind::UnsafeGlobal { calls, named }).in_file(&file)
    }

    /// The pickles of a file that is not a zip: one bare pickle, or the legacy format's five and its storages.
    fn read_pickles(input: &Input, cur: &mut ByteCursor<'_>) -> Result<TorchFile> {
        let (heap, first) = pickle::parse(cur, Limits::default())?;
        let is_legacy = matches!(heap.get(first), Node::BigInt(b) if b.as_slice() == LEGACY_MAGIC);
        if !is_legacy {
            // A bare pickle: it can hold data but no storages; tensor lookups will say so. It must fill the file:
            // what follows its STOP nobody reads (a zip appended to it is read by zip tools but not by torch).
            pickle::ensure_consumed(cur)?;
            return Ok(TorchFile {
                format: TorchFormat::Legacy,
                heap,
                root: first,
                storages: Storages::Legacy(HashMap::new()),
            });
        }
        let bad = |msg: String| Error::new(ErrorKind::NotCheckpoint(msg)).in_file(&input.name);
        let (h, proto) = pickle::parse(cur, Limits::default())?;
        if h.as_int(proto) != Some(1001) {
            return Err(bad(format!("legacy protocol version {} (expected 1001)", h.describe(proto))));
        }
        let (h, sys) = pickle::parse(cur, Limits::default())?;
        if h.dict_get(sys, "little_endian").map(|v| h.get(v)) == Some(&Node::Bool(false)) {
            return Err(Error::new(ErrorKind::Unsupported(
                "big-endian legacy checkpoint; only little-endian checkpoints are supported".into(),
            ))
            .in_file(&input.name));
        }
        let (heap, root) = pickle::parse(cur, Limits::default())?;
        let (kh, keys_id) = pickle::parse(cur, Limits::default())?;
        let keys: Vec<String> = kh
            .as_seq(keys_id)
            .ok_or_else(|| bad("legacy storage key list is not a list".into()))?
            .iter()
            .map(|&k| kh.as_str(k).map(str::to_string).ok_or_else(|| bad("storage key is not a string".into())))
            .collect::<Result<_>>()?;
        // The element size of each storage comes from how the object pickle refers to it.
        let mut elem_size: HashMap<String, u64> = HashMap::new();
        for id in 0..heap.len() as Id {
            // Any explicit dtype works here: only the key and the storage's element unit are used.
            if let Node::PersistentId(pid) = heap.get(id)
                && let Ok(info) = storage_info(&heap, *pid, Some(DType::U8))
            {
                elem_size.insert(info.key, info.unit as u64);
            }
        }
        let mut map = HashMap::new();
        let mut pos = cur.pos();
        for key in keys {
            let unit = *elem_size.get(&key).ok_or_else(|| {
                bad(format!("storage '{key}' is listed but never used, so its element size is unknown"))
            })?;
            let mut n = [0u8; 8];
            input.read_exact_at(pos, &mut n)?;
            let numel = u64::from_le_bytes(n);
            let nbytes =
                numel.checked_mul(unit).ok_or_else(|| bad(format!("storage '{key}' claims {numel} elements")))?;
            let start = pos + 8;
            let end = start.checked_add(nbytes).filter(|&e| e <= input.len()).ok_or_else(|| {
                Error::new(ErrorKind::Truncated(format!(
                    "storage '{key}' needs bytes {start}..{} but the file has {}",
                    start.saturating_add(nbytes),
                    input.len()
                )))
                .in_file(&input.name)
            })?;
            map.insert(key, (start, nbytes));
            pos = end;
        }
        // torch.save writes nothing after the last storage and torch.load reads nothing there: bytes there are a
        // second file appended (fickling's zip-and-pickle polyglot: zip tools read the zip, torch the pickles).
        if pos != input.len() {
            return Err(bad(format!(
                "{} bytes after the last storage (from byte {pos}); torch.save writes nothing there (another file \
                 appended to the checkpoint?)",
                input.len() - pos
            )));
        }
        Ok(TorchFile { format: TorchFormat::Legacy, heap, root, storages: Storages::Legacy(map) })
    }

    /// Every tensor reachable from the root, in pickle order, with resolved byte ranges.
    pub fn tensors(&self, input: &Input, input_index: usize) -> Result<Vec<FoundTensor>> {
        self.tensors_at(input, input_index, self.root, Vec::new())
    }

    /// The tensors reachable from node `id`, named from `path` on (e.g. only a Megatron `model` subtree,
    /// so that optimizer state is never resolved).
    pub fn tensors_at(&self, input: &Input, input_index: usize, id: Id, path: Vec<String>) -> Result<Vec<FoundTensor>> {
        let mut path = path;
        let mut found = Vec::new();
        let mut visits = WalkBudget::default();
        let mut cache: HashMap<String, (u64, u64)> = HashMap::new();
        let mut name_bytes = 0usize;
        // Each storage's local header is read as its first tensor is met: a URL fetches them all at once instead
        // (all of the archive's storages, a few bytes each, though a subtree may use only some).
        if let Storages::Zip { index, root } = &self.storages {
            input.data.prefetch(&index.local_headers_under(&format!("{root}data/")));
        }
        self.walk(id, &mut path, 0, &mut visits, &mut |path, leaf| {
            let (t, dtensor) = match leaf {
                Leaf::Tensor(t) => (t, None),
                Leaf::DTensor(t, m) => (t, Some(m)),
            };
            let tp = TensorPath::from_parts(path);
            name_bytes += tp.name.len();
            if found.len() >= MAX_TENSORS || name_bytes > MAX_NAME_BYTES {
                return Err(Error::new(ErrorKind::Limit(format!(
                    "more than {MAX_TENSORS} tensors or {MAX_NAME_BYTES} bytes of tensor names (one tensor reachable through exponentially many paths?)"
                ))));
            }
            let view = self.resolve(input, input_index, &tp.name, t, &mut cache)?;
            found.push(FoundTensor { path: tp, view, dtensor });
            Ok(())
        })
        .map_err(|e| e.in_file(&input.name))?;
        Ok(found)
    }

    fn walk(
        &self,
        id: Id,
        path: &mut Vec<String>,
        depth: usize,
        visits: &mut WalkBudget,
        emit: &mut dyn FnMut(&[String], Leaf) -> Result<()>,
    ) -> Result<()> {
        visits.total += 1;
        if visits.total > MAX_WALK_VISITS {
            return Err(Error::new(ErrorKind::Limit(format!(
                "the pickled object has more than {MAX_WALK_VISITS} reachable values (a self-multiplying 'billion laughs' graph?)"
            ))));
        }
        // An empty tuple is one shared node (the pickle VM keeps one per heap), and has nothing to multiply.
        let container = match self.heap.get(id) {
            Node::Tuple(v) => !v.is_empty(),
            Node::Dict(_) | Node::List(_) | Node::Object { .. } => true,
            _ => false,
        };
        if container {
            let n = visits.containers.entry(id).or_insert(0);
            *n += 1;
            if *n > MAX_CONTAINER_PATHS {
                return Err(Error::new(ErrorKind::Limit(format!(
                    "one container is reached through more than {MAX_CONTAINER_PATHS} paths (a self-multiplying 'billion laughs' graph) at '{}'",
                    shorten(&path.join("."), 80)
                ))));
            }
        }
        if depth > MAX_WALK_DEPTH {
            return Err(Error::new(ErrorKind::Limit(format!(
                "nesting depth over {MAX_WALK_DEPTH} levels (or a cycle) at '{}'",
                shorten(&path.join("."), 80)
            ))));
        }
        let h = &self.heap;
        let mut child = |key: String, id: Id, path: &mut Vec<String>| -> Result<()> {
            path.push(key);
            let r = self.walk(id, path, depth + 1, visits, emit);
            path.pop();
            r
        };
        if let Some((local, meta)) = self.dtensor(id).map_err(|m| tensor_err(&path.join("."), m))? {
            return emit(path, Leaf::DTensor(local, meta));
        }
        match h.get(id) {
            Node::Tensor(t) => emit(path, Leaf::Tensor(t))?,
            Node::Dict(items) => {
                for &(k, v) in items {
                    child(key_text(h, k), v, path)?;
                }
            }
            Node::List(v) | Node::Tuple(v) => {
                for (i, &c) in v.iter().enumerate() {
                    child(i.to_string(), c, path)?;
                }
            }
            Node::Object { state, items, list, .. } => {
                // Dict/list subclasses and objects with dict state (e.g. argparse.Namespace).
                for &(k, v) in items {
                    child(key_text(h, k), v, path)?;
                }
                for (i, &c) in list.iter().enumerate() {
                    child(i.to_string(), c, path)?;
                }
                if let Some(s) = state {
                    self.walk(*s, path, depth + 1, visits, emit)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Recognizes a DTensor: `_rebuild_wrapper_subclass(DTensor, dtype, size, ...)` with state
    /// `{_local_tensor, _spec: DTensorSpec(mesh, placements)}`.
    fn dtensor(&self, id: Id) -> Result<Option<(&TensorNode, DTensorMeta)>, String> {
        let h = &self.heap;
        let Node::Object { callable, args, state: Some(state), .. } = h.get(id) else { return Ok(None) };
        if h.global_name(*callable).as_deref() != Some("torch._utils._rebuild_wrapper_subclass") {
            return Ok(None);
        }
        let argv = h.as_seq(*args).unwrap_or(&[]);
        if !argv.first().and_then(|&c| h.global_name(c)).is_some_and(|n| n.ends_with(".DTensor")) {
            return Ok(None);
        }
        let global_shape = argv
            .get(2)
            .and_then(|&s| h.as_seq(s))
            .and_then(|s| {
                s.iter().map(|&v| h.as_int(v).and_then(|x| u64::try_from(x).ok())).collect::<Option<Vec<_>>>()
            })
            .ok_or("DTensor without a global size")?;
        // The state is a dict, or `(dict or None, slots dict)` for classes with __slots__.
        let get = |key: &str| match h.get(*state) {
            Node::Tuple(parts) => parts.iter().rev().find_map(|&p| h.dict_get(p, key)),
            _ => h.dict_get(*state, key),
        };
        let local = match get("_local_tensor").map(|l| h.get(l)) {
            Some(Node::Tensor(t)) => t,
            _ => return Err("DTensor without a local tensor".into()),
        };
        let spec = get("_spec").ok_or("DTensor without a spec")?;
        let placements = h
            .dict_get(spec, "placements")
            .and_then(|p| h.as_seq(p))
            .ok_or("DTensor spec without placements")?
            .iter()
            .map(|&p| {
                let class = match h.get(p) {
                    Node::Object { callable, .. } => h.global_name(*callable).unwrap_or_default(),
                    _ => String::new(),
                };
                let short = class.rsplit('.').next().unwrap_or("").to_string();
                match short.as_str() {
                    "Shard" => h
                        .dict_get(p, "dim")
                        .and_then(|d| h.as_int(d))
                        .and_then(|d| u64::try_from(d).ok())
                        .map(Placement::Shard)
                        .unwrap_or(Placement::Other(class)),
                    "Replicate" => Placement::Replicate,
                    _ => Placement::Other(class),
                }
            })
            .collect();
        let mesh = h.dict_get(spec, "mesh").ok_or("DTensor spec without a mesh")?;
        let coords = h
            .dict_get(mesh, "_coordinate_on_dim")
            .and_then(|c| h.as_seq(c))
            .and_then(|s| {
                s.iter().map(|&v| h.as_int(v).and_then(|x| u64::try_from(x).ok())).collect::<Option<Vec<_>>>()
            })
            .ok_or("DTensor mesh without this rank's coordinate")?;
        Ok(Some((local, DTensorMeta { global_shape, placements, coords })))
    }

    fn resolve(
        &self,
        input: &Input,
        input_index: usize,
        name: &str,
        t: &TensorNode,
        cache: &mut HashMap<String, (u64, u64)>,
    ) -> Result<StridedView> {
        let pid = match self.heap.get(t.storage) {
            Node::PersistentId(pid) => *pid,
            other => {
                return Err(tensor_err(name, format!("storage is {other:?}, not a persistent storage id")));
            }
        };
        let explicit = match t.dtype {
            Some(d) => Some(dtype_global(&self.heap, d).ok_or_else(|| {
                tensor_err(name, format!("dtype {} is not one safetensors can hold", self.heap.describe(d)))
            })?),
            None => None,
        };
        let info = storage_info(&self.heap, pid, explicit).map_err(|m| tensor_err(name, m))?;
        let (start, entry_bytes) = match cache.get(&info.key) {
            Some(&v) => v,
            None => {
                let v = match &self.storages {
                    Storages::Zip { index, root } => {
                        let entry = format!("{root}data/{}", info.key);
                        let e = index.locate(input, &entry)?.ok_or_else(|| {
                            tensor_err(name, format!("storage entry '{entry}' is missing from the archive"))
                        })?;
                        let start = e.content_start().ok_or_else(|| not_inflated(&e).in_file(&input.name))?;
                        (start, e.size)
                    }
                    Storages::Legacy(map) => *map
                        .get(&info.key)
                        .ok_or_else(|| tensor_err(name, format!("storage '{}' has no data in this file", info.key)))?,
                };
                cache.insert(info.key.clone(), v);
                v
            }
        };
        let storage_bytes =
            info.numel.checked_mul(info.unit as u64).ok_or_else(|| tensor_err(name, "storage size overflows"))?;
        if storage_bytes > entry_bytes {
            return Err(tensor_err(
                name,
                format!("storage '{}' claims {storage_bytes} bytes but holds {entry_bytes}", info.key),
            ));
        }
        let (data_start, storage_bytes) = match info.view {
            // Legacy storage views: (offset, size) in elements inside the root storage.
            Some((off, size)) => {
                let esz = info.dtype.size() as u64;
                let s = off.checked_mul(esz).and_then(|b| start.checked_add(b));
                let n = size.checked_mul(esz);
                match (s, n) {
                    (Some(s), Some(n)) if off.saturating_add(size).saturating_mul(esz) <= storage_bytes => (s, n),
                    _ => {
                        return Err(tensor_err(name, "legacy storage view lies outside its storage"));
                    }
                }
            }
            None => (start, storage_bytes),
        };
        StridedView::new(
            name,
            input_index,
            data_start,
            storage_bytes,
            info.dtype,
            t.offset,
            t.shape.clone(),
            t.strides.clone(),
            MAX_DIMS,
        )
    }
}

/// A reader of deflated entry `e` of `input`, whose own bytes are `raw` when its deflated entries are inflated.
fn entry_reader(input: &Input, raw: Option<&Rc<dyn ReadAt>>, e: &ZipEntry) -> Result<EntryReader> {
    let raw = raw.ok_or_else(|| not_inflated(e).in_file(&input.name))?;
    Ok(EntryReader::new(&input.name, raw.clone(), e.clone()))
}

fn not_inflated(e: &ZipEntry) -> Error {
    Error::new(ErrorKind::Unsupported(format!(
        "zip entry '{}' is deflated inside a zip embedded in a file (a DCP item); only a whole torch.save file's \
         deflated entries are read (torch's DCP writer stores them)",
        e.name
    )))
}

/// `s` cut to about `max` bytes on a char boundary, with an ellipsis when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Text of a dict key as it appears in a dotted name.
fn key_text(h: &Heap, k: Id) -> String {
    match h.get(k) {
        Node::Str(s) => s.clone(),
        Node::Int(i) => i.to_string(),
        Node::Bool(b) => {
            if *b {
                "True".into()
            } else {
                "False".into()
            }
        }
        _ => h.describe(k),
    }
}

struct StorageInfo {
    key: String,
    dtype: DType,
    /// Bytes per storage element: the dtype's size for typed storages, 1 for untyped.
    unit: usize,
    numel: u64,
    view: Option<(u64, u64)>,
}

fn dtype_global(h: &Heap, id: Id) -> Option<DType> {
    match h.get(id) {
        Node::Global { module, name } if module == "torch" => DType::from_torch_name(name),
        _ => None,
    }
}

/// Decodes `('storage', StorageType, key, location, numel[, view_metadata])`.
fn storage_info(h: &Heap, pid: Id, explicit: Option<DType>) -> Result<StorageInfo, String> {
    let items = h.as_seq(pid).ok_or("persistent id is not a tuple")?;
    let [tag, ty, key, _location, numel, rest @ ..] = items else {
        return Err(format!("persistent id has {} fields, expected 5 or 6", items.len()));
    };
    if h.as_str(*tag) != Some("storage") {
        return Err(format!("persistent id tag {} is not 'storage'", h.describe(*tag)));
    }
    let key = h.as_str(*key).ok_or("storage key is not a string")?.to_string();
    let numel = h.as_int(*numel).and_then(|v| u64::try_from(v).ok()).ok_or("storage size is not a non-negative int")?;
    let (ty_module, ty_name) = match h.get(*ty) {
        Node::Global { module, name } => (module.as_str(), name.as_str()),
        _ => return Err(format!("storage type {} is not a global", h.describe(*ty))),
    };
    let (dtype, unit) = if ty_name == "UntypedStorage" {
        let d = explicit.ok_or("untyped storage without a dtype")?;
        (d, 1)
    } else if let Some(d) = DType::from_storage_class(ty_name).filter(|_| ty_module == "torch") {
        (explicit.unwrap_or(d), d.size())
    } else if let Some(d) = dtype_global(h, *ty) {
        (explicit.unwrap_or(d), d.size())
    } else {
        return Err(format!("storage type {ty_module}.{ty_name} has no safetensors equivalent"));
    };
    let view = match rest.first().map(|&v| h.get(v)) {
        None | Some(Node::None) => None,
        Some(Node::Tuple(v)) if v.len() == 3 => {
            let off = h.as_int(v[1]).and_then(|x| u64::try_from(x).ok());
            let size = h.as_int(v[2]).and_then(|x| u64::try_from(x).ok());
            match (off, size) {
                (Some(o), Some(s)) => Some((o, s)),
                _ => return Err("malformed legacy storage view".into()),
            }
        }
        Some(_) => return Err("malformed legacy storage view".into()),
    };
    Ok(StorageInfo { key, dtype, unit, numel, view })
}

/// Plans the conversion of a torch.save file.
pub fn plan(mut input: Input, opts: &PlanOptions) -> Result<Planned> {
    let file = TorchFile::open(&mut input)?;
    let found = file.tensors(&input, 0)?;
    if found.is_empty() {
        return Err(Error::new(ErrorKind::NoTensors(format!(
            "the pickled object ({}) holds no tensors",
            file.heap.describe(file.root)
        )))
        .in_file(&input.name));
    }
    if let Some(t) = found.iter().find(|t| t.dtensor.is_some()) {
        return Err(Error::new(ErrorKind::Unsupported(format!(
            "'{}' is a DTensor shard of a sharded checkpoint (verl's model_world_size_W_rank_R.pt); convert the folder that holds every rank's file",
            t.path.name
        )))
        .in_file(&input.name));
    }
    let mut groups = GroupCounter::default();
    for t in &found {
        groups.add(group_of(&t.path), Some(t.view.numel() * t.view.dtype.size() as u64));
    }
    let items = found.into_iter().map(|t| (t.path, t.view)).collect();
    let (kept, sel) = select::select(items, &opts.prefix).map_err(|e| e.in_file(&input.name))?;
    let tensors = kept
        .into_iter()
        .map(|(name, view)| PlannedTensor::from_source(name, view.shape.clone(), Source::View(view), opts.dtype))
        .collect();
    let name = input.name.clone();
    let mut notes = selection_notes(&sel);
    notes.extend(crate::planned::named_globals_note(&file.heap.named_globals));
    Planned {
        kind: InputKind::TorchFile,
        plan: Plan { tensors, notes },
        format: file.format.to_string(),
        inputs: vec![input],
        groups: groups.into_groups(),
    }
    .checked(&name)
}

/// Whether Python's `tarfile.open(f, 'r:')` could open a file starting with `block`: an all-zero block (an empty
/// archive) or a header whose checksum field matches its bytes (`tarfile`'s `frombuf`: the unsigned or the
/// signed byte sum with the field counted as spaces). The field is parsed a little more leniently than Python
/// does (any underscores), so a file it opens is always caught.
fn is_tar_header(block: &[u8; 512]) -> bool {
    if block.iter().all(|&b| b == 0) {
        return true;
    }
    let Some(field) = tar_number(&block[148..156]) else { return false };
    let rest = block[..148].iter().chain(&block[156..]);
    let unsigned: i64 = 256 + rest.clone().map(|&b| i64::from(b)).sum::<i64>();
    let signed: i64 = 256 + rest.map(|&b| i64::from(b as i8)).sum::<i64>();
    field == unsigned || field == signed
}

/// A tar number field as `tarfile.nti` reads it: base-256 after a 0x80 or 0xff byte, else octal text up to the
/// first NUL, stripped of whitespace, with an optional sign and `0o` prefix; `None` where `nti` raises.
fn tar_number(field: &[u8]) -> Option<i64> {
    let (&lead, body) = field.split_first()?;
    if lead == 0o200 || lead == 0o377 {
        let n = body.iter().fold(0i64, |n, &b| (n << 8) | i64::from(b));
        return Some(if lead == 0o377 { n - (1i64 << (8 * body.len())) } else { n });
    }
    let text = field.split(|&b| b == 0).next().unwrap_or(&[]);
    if !text.is_ascii() {
        return None;
    }
    let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0x1c..=0x1f);
    let start = text.iter().position(|b| !is_space(b)).unwrap_or(text.len());
    let end = text.iter().rposition(|b| !is_space(b)).map_or(start, |e| e + 1);
    let t: Vec<u8> = text[start..end].iter().copied().filter(|&b| b != b'_').collect();
    if t.is_empty() {
        return Some(0);
    }
    let (neg, t) = match t.split_first() {
        Some((b'-', r)) => (true, r),
        Some((b'+', r)) => (false, r),
        _ => (false, &t[..]),
    };
    let t = t.strip_prefix(b"0o").or_else(|| t.strip_prefix(b"0O")).unwrap_or(t);
    if t.is_empty() || !t.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return None;
    }
    let n = t.iter().fold(0i64, |n, &b| n * 8 + i64::from(b - b'0'));
    Some(if neg { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pickle_without_proto_is_read_as_torch_load_reads_it() {
        // pickle.dumps(..., protocol=0) of a call: torch.load hands a non-zip file to the unpickler, which would run
        // it; the reader names the call instead of calling the file unknown.
        let mut input = Input::new("p0.pt", Box::new(b"cos\nsystem\n(Vid\ntR.".to_vec()));
        let e = TorchFile::open(&mut input).err().expect("refused");
        assert!(matches!(e.kind(), ErrorKind::UnsafeGlobal { calls, .. } if calls[0].global == "os.system"), "{e}");
        // The legacy layout's pickles run in turn: a refusal in the first names the calls of the later ones too.
        let mut input = Input::new("p1.pt", Box::new(b"cbuiltins\neval\n(V1\ntR.cos\nsystem\n(Vid\ntR.".to_vec()));
        let e = TorchFile::open(&mut input).err().expect("refused");
        let ErrorKind::UnsafeGlobal { calls, .. } = e.kind() else { panic!("{e}") };
        let names: Vec<&str> = calls.iter().map(|c| c.global.as_str()).collect();
        assert_eq!(names, ["builtins.eval", "os.system"]);
        // Bytes no pickle starts with stay "not a torch checkpoint".
        let mut input = Input::new("r.pt", Box::new(b"R\xf2&e".to_vec()));
        assert_eq!(TorchFile::open(&mut input).err().expect("refused").label(), "not-checkpoint");
    }

    #[test]
    fn tar_number_fields_read_as_tarfile_nti_reads_them() {
        // Values printed by Python 3.11's tarfile.nti for the same 8 bytes (None where it raises).
        let cases: [(&[u8; 8], Option<i64>); 9] = [
            (b"0000644\0", Some(420)),
            (b"  644 \0\0", Some(420)),
            (b"\x80\0\0\0\0\0\x01\0", Some(256)),
            (b"\xff\xff\xff\xff\xff\xff\xff\xff", Some(-1)),
            (b"-0o7\0\0\0\0", Some(-7)),
            (b"\0\0\0\0\0\0\0\0", Some(0)),
            (b"12_3\0\0\0\0", Some(83)),
            (b"089\0\0\0\0\0", None),
            (b"\xc3\xa9\0\0\0\0\0\0", None),
        ];
        for (field, want) in cases {
            assert_eq!(tar_number(field), want, "{field:?}");
        }
    }

    #[test]
    fn a_tar_header_is_told_by_its_checksum() {
        // A ustar header for "x" as tarfile writes it, then the same bytes with one byte changed.
        let mut h = [0u8; 512];
        h[0] = b'x';
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(b"00000000001\0");
        h[156] = b'0';
        h[257..265].copy_from_slice(b"ustar\x0000");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        assert!(is_tar_header(&h));
        h[0] = 0x80;
        assert!(!is_tar_header(&h));
        assert!(is_tar_header(&[0u8; 512]), "tarfile opens an all-zero block as an empty archive");
    }
}
