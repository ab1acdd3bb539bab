//! `scan`: a safety report of a pickle-based file, made without executing anything: every global its pickles
//! name, each classed by the trust policy's allowlist ([`crate::pickle::policy`]), whether
//! `torch.load(weights_only=True)` would accept those globals, whether ckptconv can convert it, and its tensors.
//!
//! The pickles run on ckptconv's own reader, which builds inert records and calls nothing; the reader logs every
//! global it meets (allowed or not) through [`Input::global_log`]. A file is dangerous when it names any global off
//! the allowlist: an allowlist, not a denylist, since the next gadget is one nobody listed. Globals known to run
//! code are marked as such on top, for the reader of the report.

use crate::error::{ErrorKind, Result};
use crate::io::{ByteCursor, GlobalLog, Input};
use crate::pickle::Limits;
use crate::pickle::policy::{self, Role};
use crate::torch::TorchFile;
use crate::torch::zip::ZipIndex;

/// What a global is to the allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Rebuilds a tensor from a storage.
    TensorRebuild,
    /// A container, scalar, dtype, storage or data class on the allowlist.
    AllowedData,
    /// Off the allowlist.
    NotAllowlisted,
    /// Off the allowlist and known to run code (a shell, `eval`, an import, a file operation).
    CodeExecuting,
}

impl Class {
    /// The report's spelling.
    pub fn label(self) -> &'static str {
        match self {
            Class::TensorRebuild => "tensor rebuild",
            Class::AllowedData => "allowed data class",
            Class::NotAllowlisted => "not allowlisted",
            Class::CodeExecuting => "not allowlisted, known code-executing",
        }
    }

    /// Whether a file naming it is dangerous.
    pub fn dangerous(self) -> bool {
        matches!(self, Class::NotAllowlisted | Class::CodeExecuting)
    }
}

/// One global a file's pickles name.
#[derive(Debug, Clone)]
pub struct Global {
    /// `module.name`, Python 3 spelling.
    pub name: String,
    /// Its class.
    pub class: Class,
    /// How a refused call would have used it (`called by REDUCE`, ...), when the reader saw one.
    pub call: Option<String>,
    /// Byte offset of its first use in its pickle.
    pub offset: u64,
    /// Whether `torch.load(weights_only=True)` accepts it.
    pub weights_only: bool,
}

/// One tensor of a file that converts.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Its name in the state dict.
    pub name: String,
    /// safetensors dtype name.
    pub dtype: &'static str,
    /// Shape.
    pub shape: Vec<u64>,
}

/// A scan's findings.
#[derive(Debug, Clone)]
pub struct Report {
    /// The file.
    pub file: String,
    /// What the file is (a torch.save zip, a legacy file, a bare pickle), when the reader got that far.
    pub container: Option<String>,
    /// Every global named, in order of first use.
    pub globals: Vec<Global>,
    /// Whether `torch.load(weights_only=True)` would accept every global named (its structural checks aside).
    pub weights_only: bool,
    /// The tensors, when ckptconv can convert the file; otherwise why not.
    pub convert: std::result::Result<Vec<Tensor>, String>,
    /// Parts that hold code-capable bytes the scan could not read (a deflated or encrypted zip entry outside a
    /// torch layout): what is in them is unknown, so the file is not called clean.
    pub unchecked: Vec<String>,
}

impl Report {
    /// The report as JSON (`scan --json`, and the npm package's `scan()`, byte for byte).
    pub fn to_json(&self) -> String {
        let globals: Vec<serde_json::Value> = self
            .globals
            .iter()
            .map(|g| {
                serde_json::json!({"name": g.name, "class": g.class.label(), "dangerous": g.class.dangerous(),
                    "call": g.call, "offset": g.offset, "weights_only": g.weights_only})
            })
            .collect();
        let (converts, tensors, error) = match &self.convert {
            Ok(ts) => (
                true,
                ts.iter().map(|x| serde_json::json!({"name": x.name, "dtype": x.dtype, "shape": x.shape})).collect(),
                None,
            ),
            Err(e) => (false, Vec::new(), Some(e.clone())),
        };
        let v = serde_json::json!({"file": self.file, "container": self.container, "globals": globals,
            "weights_only": self.weights_only, "converts": converts, "convert_error": error, "tensors": tensors,
            "unchecked": self.unchecked, "dangerous": self.dangerous()});
        format!("{v:#}\n")
    }

    /// Whether the file names anything off the allowlist, or holds a part the scan could not read.
    pub fn dangerous(&self) -> bool {
        self.globals.iter().any(|g| g.class.dangerous()) || !self.unchecked.is_empty()
    }
}

/// Globals that run code when called (or imported for a call), marked on top of "not allowlisted".
const CODE_EXECUTING: &[&str] = &[
    "builtins.eval",
    "builtins.exec",
    "builtins.compile",
    "builtins.__import__",
    "builtins.getattr",
    "builtins.setattr",
    "builtins.delattr",
    "builtins.open",
    "builtins.breakpoint",
    "builtins.input",
    "builtins.globals",
    "builtins.vars",
    "os.system",
    "os.popen",
    "os.execv",
    "os.execve",
    "os.execl",
    "os.execvp",
    "os.spawnl",
    "os.spawnv",
    "os.fork",
    "os.remove",
    "os.unlink",
    "os.rmdir",
    "os.rename",
    "os.putenv",
    "os.kill",
    "posix.system",
    "posix.popen",
    "nt.system",
    "nt.popen",
    "pty.spawn",
    "webbrowser.open",
    "importlib.import_module",
    "pickle.loads",
    "pickle.load",
    "_pickle.loads",
    "_pickle.load",
    "marshal.loads",
    "types.FunctionType",
    "types.CodeType",
    "code.interact",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copy",
    "operator.attrgetter",
    "operator.methodcaller",
    "functools.partial",
    "torch.hub.load",
    "torch.load",
    "numpy.load",
    "urllib.request.urlopen",
];

/// Modules every global of which is code-executing.
const CODE_EXECUTING_MODULES: &[&str] =
    &["subprocess", "runpy", "ctypes", "socket", "requests", "httplib", "http.client", "aiohttp", "asyncio"];

/// The globals `torch.load(weights_only=True)` accepts without `add_safe_globals`: torch 2.15.0's
/// `torch._weights_only_unpickler._get_allowed_globals()`, listed by `tests/e2e/test_scan.py` (which checks this table).
const TORCH_WEIGHTS_ONLY: &[&str] = &[
    "_codecs.encode",
    "builtins.bytearray",
    "builtins.complex",
    "builtins.set",
    "collections.Counter",
    "collections.OrderedDict",
    "torch.BFloat16Storage",
    "torch.BFloat16Tensor",
    "torch.BoolStorage",
    "torch.BoolTensor",
    "torch.ByteStorage",
    "torch.ByteTensor",
    "torch.CharStorage",
    "torch.CharTensor",
    "torch.ComplexDoubleStorage",
    "torch.ComplexFloatStorage",
    "torch.DoubleStorage",
    "torch.DoubleTensor",
    "torch.FloatStorage",
    "torch.FloatTensor",
    "torch.HalfStorage",
    "torch.HalfTensor",
    "torch.IntStorage",
    "torch.IntTensor",
    "torch.LongStorage",
    "torch.LongTensor",
    "torch.QInt32Storage",
    "torch.QInt8Storage",
    "torch.QUInt2x4Storage",
    "torch.QUInt4x2Storage",
    "torch.QUInt8Storage",
    "torch.ShortStorage",
    "torch.ShortTensor",
    "torch.Size",
    "torch.Tensor",
    "torch._tensor._rebuild_from_type_v2",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_wrapper_subclass",
    "torch.bcomplex32",
    "torch.bfloat16",
    "torch.bits16",
    "torch.bits1x8",
    "torch.bits2x4",
    "torch.bits4x2",
    "torch.bits8",
    "torch.bool",
    "torch.complex128",
    "torch.complex32",
    "torch.complex64",
    "torch.cuda.BFloat16Storage",
    "torch.cuda.BFloat16Tensor",
    "torch.cuda.BoolStorage",
    "torch.cuda.BoolTensor",
    "torch.cuda.ByteStorage",
    "torch.cuda.ByteTensor",
    "torch.cuda.CharStorage",
    "torch.cuda.CharTensor",
    "torch.cuda.ComplexDoubleStorage",
    "torch.cuda.ComplexFloatStorage",
    "torch.cuda.DoubleStorage",
    "torch.cuda.DoubleTensor",
    "torch.cuda.FloatStorage",
    "torch.cuda.FloatTensor",
    "torch.cuda.HalfStorage",
    "torch.cuda.HalfTensor",
    "torch.cuda.IntStorage",
    "torch.cuda.IntTensor",
    "torch.cuda.LongStorage",
    "torch.cuda.LongTensor",
    "torch.cuda.ShortStorage",
    "torch.cuda.ShortTensor",
    "torch.cuda.sparse.BFloat16Tensor",
    "torch.cuda.sparse.ByteTensor",
    "torch.cuda.sparse.CharTensor",
    "torch.cuda.sparse.DoubleTensor",
    "torch.cuda.sparse.FloatTensor",
    "torch.cuda.sparse.HalfTensor",
    "torch.cuda.sparse.IntTensor",
    "torch.cuda.sparse.LongTensor",
    "torch.cuda.sparse.ShortTensor",
    "torch.device",
    "torch.float16",
    "torch.float32",
    "torch.float4_e2m1fn_x2",
    "torch.float64",
    "torch.float8_e4m3fn",
    "torch.float8_e4m3fnuz",
    "torch.float8_e5m2",
    "torch.float8_e5m2fnuz",
    "torch.float8_e8m0fnu",
    "torch.int1",
    "torch.int16",
    "torch.int2",
    "torch.int3",
    "torch.int32",
    "torch.int4",
    "torch.int5",
    "torch.int6",
    "torch.int64",
    "torch.int7",
    "torch.int8",
    "torch.nn.parameter.Parameter",
    "torch.per_channel_affine",
    "torch.per_channel_affine_float_qparams",
    "torch.per_channel_symmetric",
    "torch.per_tensor_affine",
    "torch.per_tensor_symmetric",
    "torch.qint32",
    "torch.qint8",
    "torch.quint2x4",
    "torch.quint4x2",
    "torch.quint8",
    "torch.serialization._get_layout",
    "torch.sparse.BFloat16Tensor",
    "torch.sparse.ByteTensor",
    "torch.sparse.CharTensor",
    "torch.sparse.DoubleTensor",
    "torch.sparse.FloatTensor",
    "torch.sparse.HalfTensor",
    "torch.sparse.IntTensor",
    "torch.sparse.LongTensor",
    "torch.sparse.ShortTensor",
    "torch.storage.TypedStorage",
    "torch.storage.UntypedStorage",
    "torch.uint1",
    "torch.uint16",
    "torch.uint2",
    "torch.uint3",
    "torch.uint32",
    "torch.uint4",
    "torch.uint5",
    "torch.uint6",
    "torch.uint64",
    "torch.uint7",
    "torch.uint8",
];

fn class_of(full: &str) -> Class {
    let (module, name) = full.rsplit_once('.').unwrap_or(("", full));
    match policy::classify(module, name) {
        Some(r) if r.role == Role::Rebuild => Class::TensorRebuild,
        Some(_) => Class::AllowedData,
        None if CODE_EXECUTING.contains(&full)
            || CODE_EXECUTING_MODULES.iter().any(|m| module == *m || module.starts_with(&format!("{m}."))) =>
        {
            Class::CodeExecuting
        }
        None => Class::NotAllowlisted,
    }
}

/// Scans one file. An error only when the file cannot be read at all (no pickle in it got as far as naming
/// anything): what a file that names globals holds is always a report, whatever else is wrong with it.
pub fn scan(mut input: Input) -> Result<Report> {
    let log = GlobalLog::default();
    input.global_log = Some(log.clone());
    let file = input.name.clone();
    let raw_len = input.len();
    let opened = TorchFile::open(&mut input);
    let mut calls = Vec::new();
    // The pickle the torch reader has run already (its globals are in the log): the sweep need not run it again.
    let mut read_pkl = None;
    let (container, convert) = match opened {
        Ok(tf) => {
            let container = tf.format.to_string();
            if let crate::torch::TorchFormat::Zip { root } = &tf.format {
                read_pkl = Some(format!("{root}/data.pkl"));
            }
            let found = tf.tensors(&input, 0).map(|ts| {
                ts.into_iter()
                    .map(|t| Tensor {
                        name: t.path.name,
                        dtype: t.view.dtype.safetensors_name(),
                        shape: t.dtensor.map_or(t.view.shape, |d| d.global_shape),
                    })
                    .collect()
            });
            let found = found.map_err(|e| e.to_string()).and_then(|ts: Vec<Tensor>| {
                if ts.is_empty() { Err("it holds no tensors".to_string()) } else { Ok(ts) }
            });
            (Some(container), found)
        }
        Err(e) => {
            if let ErrorKind::UnsafeGlobal { calls: c, .. } = e.kind() {
                calls = c.clone();
            }
            (None, Err(e.to_string()))
        }
    };
    // Beyond what torch.load reads: every pickle a scanner would find (every zip entry, pickles stacked after a
    // STOP, the pickle in a NumPy .npy), each run on the same inert reader, its globals added to the log.
    let unchecked = sweep(&input, raw_len, read_pkl.as_deref());
    let logged = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
    if logged.is_empty()
        && unchecked.is_empty()
        && let Err(text) = &convert
        && container.is_none()
    {
        // Nothing named and nothing read: say why as the error it is.
        return Err(crate::error::Error::new(ErrorKind::NotCheckpoint(format!("nothing to scan: {text}"))));
    }
    let globals: Vec<Global> = logged
        .into_iter()
        .map(|(name, offset)| Global {
            class: class_of(&name),
            call: calls.iter().find(|c| c.global == name).map(|c| c.how.clone()),
            weights_only: TORCH_WEIGHTS_ONLY.binary_search(&name.as_str()).is_ok(),
            name,
            offset,
        })
        .collect();
    let weights_only = globals.iter().all(|g| g.weights_only);
    Ok(Report { file, container, globals, weights_only, convert, unchecked })
}

/// Most pickles read one after the other from one range (a stack of pickles).
const MAX_STACKED: usize = 64;

/// Runs every pickle a scanner looks for, for their globals only (but the zip entry `read`, already run); returns
/// the parts it could not read.
fn sweep(input: &Input, raw_len: u64, read: Option<&str>) -> Vec<String> {
    let mut unchecked = Vec::new();
    let mut head = [0u8; 10];
    let n = input.len().min(10) as usize;
    if input.read_exact_at(0, &mut head[..n]).is_err() {
        return unchecked;
    }
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        match ZipIndex::read_range(input, 0, raw_len) {
            Ok(mut index) => {
                // TorchFile::open put a reader in place that also serves the deflated entries' inflated bytes past
                // the file's end (at the places place_deflated gives them): read those as they are.
                let inflating = input.len() > raw_len && index.place_deflated(raw_len).is_ok();
                let names: Vec<String> = index.names().map(str::to_string).collect();
                for name in names.into_iter().filter(|n| Some(n.as_str()) != read) {
                    match index.locate(input, &name) {
                        Ok(Some(e)) => match e.content_start() {
                            Some(at) if !e.is_deflated() || inflating => {
                                // A pickle by name or by its PROTO opcode (a renamed one), or an .npy (an .npz's
                                // entries); storages are raw bytes.
                                let mut first = [0u8; 10];
                                let n = e.size.min(10) as usize;
                                let first = match input.read_exact_at(at, &mut first[..n]) {
                                    Ok(()) => &first[..n],
                                    Err(_) => &[][..],
                                };
                                if first.starts_with(b"\x93NUMPY") {
                                    npy(input, at, at + e.size, first);
                                } else if first.first() == Some(&0x80)
                                    || name.ends_with(".pkl")
                                    || name.ends_with(".pickle")
                                {
                                    stacked(input, at, at + e.size);
                                }
                            }
                            _ => unchecked.push(format!("zip entry '{name}' is deflated and could not be inflated")),
                        },
                        Ok(None) => {}
                        Err(e) => unchecked.push(format!("zip entry '{name}': {}", e.kind())),
                    }
                }
            }
            Err(e) => unchecked.push(format!("the zip directory: {}", e.kind())),
        }
    } else if head.starts_with(b"\x93NUMPY") {
        npy(input, 0, input.len(), head);
    } else {
        stacked(input, 0, input.len());
    }
    unchecked
}

/// The pickle of an object `.npy` in `[start, end)` whose first bytes are `head`: magic, version, header length
/// (2 bytes in version 1, 4 after), the header, then the data, which for object arrays is a pickle.
fn npy(input: &Input, start: u64, end: u64, head: &[u8]) {
    let (len, at) = match head {
        [.., 1, _, a, b] if head.len() == 10 => (u64::from(u16::from_le_bytes([*a, *b])), 10),
        _ if head.len() == 10 => {
            let mut l = [0u8; 4];
            if input.read_exact_at(start + 8, &mut l).is_err() {
                return;
            }
            (u64::from(u32::from_le_bytes(l)), 12)
        }
        _ => return,
    };
    stacked(input, start + at + len, end);
}

/// Reads pickles one after another in `[start, end)` until one does not parse.
fn stacked(input: &Input, start: u64, end: u64) {
    let mut at = start;
    for _ in 0..MAX_STACKED {
        if at >= end {
            return;
        }
        let Ok(mut cur) = ByteCursor::new(input, at, end) else { return };
        match crate::pickle::parse(&mut cur, Limits::default()) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::UnsafeGlobal { .. }) => {}
            Err(_) => return,
        }
        if cur.pos() <= at {
            return;
        }
        at = cur.pos();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weights_only_table_is_sorted_for_binary_search() {
        assert!(TORCH_WEIGHTS_ONLY.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn classes_follow_the_allowlist() {
        assert_eq!(class_of("torch._utils._rebuild_tensor_v2"), Class::TensorRebuild);
        assert_eq!(class_of("collections.OrderedDict"), Class::AllowedData);
        assert_eq!(class_of("os.system"), Class::CodeExecuting);
        assert_eq!(class_of("subprocess.Popen"), Class::CodeExecuting);
        assert_eq!(class_of("mypkg.Config"), Class::NotAllowlisted);
    }
}
