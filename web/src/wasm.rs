//! The wasm-bindgen API (browser only).

use ckptconv::conversion::{Checkpoint, Conversion, ConversionOptions, Output};
use ckptconv::dtype::DType;
use ckptconv::hf::BaseModel;
use ckptconv::io::{AllowedGlobals, Folder, Input, ReadAt, Trusting};
use ckptconv::lora::{self, LoraMode, LoraOptions};
use ckptconv::pickle::policy;
use ckptconv::planned::PlanOptions;
use ckptconv::select::Prefix;
use ckptconv::write::safetensors;
use ckptconv::write::{OutputSet, Piece, Puller};
use ckptconv::{Error, ErrorKind};
use serde::Deserialize;
use std::cell::RefCell;
use std::collections::BTreeMap;
use wasm_bindgen::prelude::*;

/// Reads below this size go through a cached block; bigger ones go straight into the caller's buffer.
const SMALL_READ: usize = 64 << 10;
/// The cached block for small reads of a Blob. One `FileReaderSync` call costs about a millisecond whatever its
/// size, but planning touches many scattered headers (zip entries), so a miss fetches only a small block.
const BLOCK: u64 = 64 << 10;

/// Where an input's bytes come from: a `Blob` (read with `FileReaderSync`, dedicated workers only), or a JS
/// object `{size, read(offset, length) -> Uint8Array, block?}` whose `read` answers synchronously (the npm
/// package's readers of URLs, Node files and Blob-likes; `block` is its small-read block size, small for URLs so
/// that planning fetches little more than the headers it reads).
#[derive(Clone)]
enum Source {
    Blob(web_sys::Blob),
    Js { obj: JsValue, read: js_sys::Function, size: u64, block: u64 },
}

impl Source {
    /// From an input's `file`: a Blob, or a reader object as above.
    fn from_js(v: JsValue) -> Option<Source> {
        if let Some(b) = v.dyn_ref::<web_sys::Blob>() {
            return Some(Source::Blob(b.clone()));
        }
        let get = |k: &str| js_sys::Reflect::get(&v, &k.into()).ok();
        let read = get("read")?.dyn_into::<js_sys::Function>().ok()?;
        let size = get("size")?.as_f64().filter(|s| s.is_finite() && *s >= 0.0 && s.fract() == 0.0)? as u64;
        let block = get("block").and_then(|b| b.as_f64()).filter(|b| *b >= 1.0).map_or(BLOCK, |b| b as u64);
        Some(Source::Js { obj: v, read, size, block: block.min(BLOCK) })
    }

    fn len(&self) -> u64 {
        match self {
            Source::Blob(b) => b.size() as u64,
            Source::Js { size, .. } => *size,
        }
    }

    /// The value handed back to JS in `copy` pieces.
    fn js(&self) -> JsValue {
        match self {
            Source::Blob(b) => b.into(),
            Source::Js { obj, .. } => obj.clone(),
        }
    }
}

/// An input read from a [`Source`], small reads through a cached block.
struct SourceReadAt {
    source: Source,
    len: u64,
    block_size: u64,
    reader: Option<web_sys::FileReaderSync>,
    block: RefCell<(u64, Vec<u8>)>,
}

impl SourceReadAt {
    fn new(source: Source) -> Result<Self, JsValue> {
        let len = source.len();
        let (reader, block_size) = match &source {
            Source::Blob(_) => (Some(web_sys::FileReaderSync::new()?), BLOCK),
            Source::Js { block, .. } => (None, *block),
        };
        Ok(SourceReadAt { source, len, block_size, reader, block: RefCell::new((0, Vec::new())) })
    }

    fn raw(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        let arr = match (&self.source, &self.reader) {
            (Source::Blob(blob), Some(reader)) => {
                let slice = blob
                    .slice_with_f64_and_f64(offset as f64, end as f64)
                    .map_err(|e| std::io::Error::other(format!("Blob.slice failed: {}", js_text(&e))))?;
                let ab = reader
                    .read_as_array_buffer(&slice)
                    .map_err(|e| std::io::Error::other(format!("FileReaderSync failed: {}", js_text(&e))))?;
                js_sys::Uint8Array::new(&ab)
            }
            (Source::Js { obj, read, .. }, _) => read
                .call2(obj, &(offset as f64).into(), &(buf.len() as f64).into())
                .map_err(|e| std::io::Error::other(js_text(&e)))?
                .dyn_into::<js_sys::Uint8Array>()
                .map_err(|_| std::io::Error::other("the input's read() did not return a Uint8Array"))?,
            (Source::Blob(_), None) => return Err(std::io::Error::other("internal: a Blob without a reader")),
        };
        if arr.length() as usize != buf.len() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read from the file"));
        }
        arr.copy_to(buf);
        Ok(())
    }
}

/// A thrown JS value as text: an Error's message, else its string form.
fn js_text(e: &JsValue) -> String {
    if let Some(err) = e.dyn_ref::<js_sys::Error>() {
        return String::from(err.message());
    }
    e.as_string().unwrap_or_else(|| format!("{e:?}"))
}

impl ReadAt for SourceReadAt {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end of the file"));
        }
        if buf.len() >= SMALL_READ {
            return self.raw(offset, buf);
        }
        let mut block = self.block.borrow_mut();
        let (start, data) = &mut *block;
        let hit = !data.is_empty() && offset >= *start && offset + buf.len() as u64 <= *start + data.len() as u64;
        if !hit {
            let b = self.block_size;
            let s = offset / b * b;
            // Two blocks, so a small read that straddles a block boundary still hits (and a read bigger than
            // a small source block is read whole).
            let e = (s + 2 * b).max(offset + buf.len() as u64).min(self.len);
            data.resize((e - s) as usize, 0);
            self.raw(s, data)?;
            *start = s;
        }
        let at = (offset - *start) as usize;
        buf.copy_from_slice(&data[at..at + buf.len()]);
        Ok(())
    }

    fn release(&self) {
        *self.block.borrow_mut() = (0, Vec::new());
    }
}

/// Files with their relative paths, as a folder.
struct JsFolder {
    name: String,
    files: BTreeMap<String, Source>,
}

impl JsFolder {
    /// From an array of `{path, file}`; a common top folder becomes the folder's name.
    fn from_js(entries: &js_sys::Array, fallback: &str) -> Result<JsFolder, JsError> {
        let mut files = BTreeMap::new();
        for e in entries.iter() {
            let path = js_sys::Reflect::get(&e, &"path".into())
                .ok()
                .and_then(|p| p.as_string())
                .ok_or_else(|| JsError::new("each input needs a string `path`"))?;
            let file = js_sys::Reflect::get(&e, &"file".into()).ok().and_then(Source::from_js).ok_or_else(|| {
                JsError::new(&format!("input '{path}' has no `file` (a Blob, or a reader with size and read())"))
            })?;
            files.insert(path.trim_start_matches('/').to_string(), file);
        }
        // Strip a top folder shared by every path, so a dropped `global_step_50/` reads as that folder.
        let top = files.keys().next().and_then(|k| k.split_once('/')).map(|(t, _)| format!("{t}/"));
        let name = match top {
            Some(t) if !files.is_empty() && files.keys().all(|k| k.starts_with(&t)) => {
                files = files.into_iter().map(|(k, v)| (k[t.len()..].to_string(), v)).collect();
                t.trim_end_matches('/').to_string()
            }
            _ => fallback.to_string(),
        };
        Ok(JsFolder { name, files })
    }
}

impl JsFolder {
    /// How messages name a file: its path inside the dropped folder (or just its name for a lone file).
    fn display(&self, rel: &str) -> String {
        if self.name.is_empty() { rel.to_string() } else { format!("{}/{rel}", self.name) }
    }
}

impl Folder for JsFolder {
    fn name(&self) -> &str {
        &self.name
    }
    fn files(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }
    fn open(&self, rel: &str) -> ckptconv::Result<Input> {
        let shown = self.display(rel);
        let source = self
            .files
            .get(rel)
            .ok_or_else(|| Error::new(ErrorKind::Io("no such file among the inputs".into())).in_file(&shown))?;
        let r =
            SourceReadAt::new(source.clone()).map_err(|e| Error::new(ErrorKind::Io(js_text(&e))).in_file(&shown))?;
        Ok(Input::new(shown, Box::new(r)))
    }
}

fn js_err(e: Error) -> JsError {
    JsError::new(&e.to_string())
}

/// The options object of [`Job::new`] (every field optional).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct JsOptions {
    /// Output dtype for float tensors: keep, bf16, fp16 or fp32.
    dtype: Option<String>,
    /// `merge` or `adapter`.
    lora: Option<String>,
    lora_alpha: Option<f64>,
    lora_r: Option<f64>,
    /// e.g. `5GB`; empty means one file.
    max_shard_size: Option<String>,
    prefix: Option<String>,
    allow_mismatch: bool,
    /// Convert one shard of a sharded Hugging Face set alone (`--allow-partial`).
    allow_partial: bool,
    /// Verbatim ranges come as `copy` pieces naming an input Blob.
    copies: bool,
    /// `convert` (the default) or `dcp-to-pt`: the checkpoint's tensors as saved, in one torch.save file.
    mode: Option<String>,
    /// `safetensors` (the default) or `pt` (one `pytorch_model.bin`).
    format: Option<String>,
    /// The torch.save file's name in `dcp-to-pt` mode (default `full_weights.pt`, RLinf's).
    output_name: Option<String>,
    /// `module.name` of globals the checkpoint's pickles may call beyond the allowlist (`--allow-global`).
    allow_globals: Vec<String>,
}

impl JsOptions {
    fn allowed_globals(&self) -> Result<AllowedGlobals, JsError> {
        let checked: Result<Vec<String>, String> =
            self.allow_globals.iter().map(|g| policy::parse_allowed(g)).collect();
        checked.map(AllowedGlobals::from).map_err(|e| JsError::new(&format!("allowGlobals: {e}")))
    }

    fn conversion(&self, base_folder: Option<&JsFolder>) -> Result<ConversionOptions, JsError> {
        let dtype = match &self.dtype {
            Some(d) => DType::from_cli(d).map_err(|e| JsError::new(&e))?,
            None => None,
        };
        let adapter_config = match base_folder {
            Some(f) if f.files.contains_key("adapter_config.json") => {
                let i = f.open("adapter_config.json").map_err(js_err)?;
                Some(lora::read_adapter_config(&i).map_err(js_err)?)
            }
            _ => None,
        };
        let plan = PlanOptions {
            dtype,
            prefix: match &self.prefix {
                Some(p) => Prefix::Explicit(p.clone()),
                None => Prefix::Auto,
            },
            require_base: true,
            allow_mismatch: self.allow_mismatch,
            allow_partial: self.allow_partial,
            allow_globals: self.allowed_globals()?,
            lora: LoraOptions {
                mode: if self.lora.as_deref() == Some("adapter") { LoraMode::Adapter } else { LoraMode::Merge },
                explicit: self.lora.is_some(),
                alpha: self.lora_alpha,
                r: self.lora_r.map(|r| r as u64),
                r_origin: None,
                adapter_config,
            },
        };
        let as_saved = match self.mode.as_deref() {
            None | Some("convert") => false,
            Some("dcp-to-pt") => true,
            Some(m) => return Err(JsError::new(&format!("unknown mode '{m}' (convert or dcp-to-pt)"))),
        };
        let output = match (as_saved, self.format.as_deref()) {
            (true, _) => {
                Output::TorchSave { name: self.output_name.clone().unwrap_or_else(|| "full_weights.pt".into()) }
            }
            (false, None | Some("safetensors")) => Output::Safetensors {
                max_shard: match &self.max_shard_size {
                    Some(s) if !s.is_empty() => Some(safetensors::parse_size(s).map_err(|e| JsError::new(&e))?),
                    _ => None,
                },
            },
            (false, Some("pt")) => Output::TorchSave { name: "pytorch_model.bin".into() },
            (false, Some(f)) => return Err(JsError::new(&format!("unknown format '{f}' (safetensors or pt)"))),
        };
        Ok(ConversionOptions { plan, output, as_saved, ..Default::default() })
    }
}

/// A conversion: planned when constructed, then pulled piece by piece with `next()`.
#[wasm_bindgen]
pub struct Job {
    conv: Conversion,
    puller: Puller,
    /// With `options.copies`: the Blob or reader behind each input, so verbatim ranges go out as `copy` pieces.
    blobs: Option<Vec<JsValue>>,
}

#[wasm_bindgen]
impl Job {
    /// Plans a conversion. `files`: array of `{path, file}` (a single file, or a dropped folder);
    /// `base`: the same for an optional base-model folder (or `null`); `options`: `{dtype, lora, loraAlpha,
    /// loraR, maxShardSize, prefix, allowMismatch, allowGlobals, copies, mode, format, outputName}`. With `copies: true`, bytes
    /// that go to the output unchanged come as `copy` pieces naming a range of an input Blob, for the caller to
    /// read and write itself, instead of passing through wasm memory.
    #[wasm_bindgen(constructor)]
    pub fn new(files: js_sys::Array, base: JsValue, options: JsValue) -> Result<Job, JsError> {
        // A lone file is named by itself in messages; a folder without a shared top folder as "input".
        let folder = JsFolder::from_js(&files, if files.length() == 1 { "" } else { "input" })?;
        let opts: JsOptions = if options.is_object() {
            serde_wasm_bindgen::from_value(options).map_err(|e| JsError::new(&format!("options: {e}")))?
        } else {
            JsOptions::default()
        };
        let base_folder = match base.dyn_ref::<js_sys::Array>() {
            Some(a) if a.length() > 0 && opts.mode.as_deref() != Some("dcp-to-pt") => {
                Some(JsFolder::from_js(a, "base")?)
            }
            _ => None,
        };
        // The base's pickled weights may call what the checkpoint's may.
        let trusted_base = match &base_folder {
            Some(f) => Some(Trusting { folder: f, allowed: opts.allowed_globals()? }),
            None => None,
        };
        let base_model = match &trusted_base {
            Some(f) => Some(BaseModel::open(f).map_err(js_err)?),
            None => None,
        };
        let conversion = opts.conversion(base_folder.as_ref())?;
        // A single file is a torch.save or safetensors file; anything else is a folder.
        let checkpoint = match folder.files.keys().next() {
            Some(rel) if folder.files.len() == 1 => Checkpoint::File(folder.open(rel).map_err(js_err)?),
            _ => Checkpoint::Folder(&folder),
        };
        let conv = Conversion::new(checkpoint, base_model.as_ref(), &conversion).map_err(js_err)?;
        // Inputs are named as their folder shows them; every one must have its Blob, or nothing is copied.
        let blobs = opts
            .copies
            .then(|| {
                let mut by_name = BTreeMap::new();
                for f in std::iter::once(&folder).chain(&base_folder) {
                    for (rel, blob) in &f.files {
                        by_name.insert(f.display(rel), blob);
                    }
                }
                conv.inputs().iter().map(|i| by_name.get(&i.name).map(|b| b.js())).collect::<Option<Vec<_>>>()
            })
            .flatten();
        let puller = Puller::new(blobs.is_some());
        Ok(Job { conv, puller, blobs })
    }

    /// The plan as JSON: format, notes, groups, tensors (name, dtype, shape, bytes, source_dtype), total bytes and
    /// output files.
    #[wasm_bindgen(js_name = planJson)]
    pub fn plan_json(&self) -> String {
        let mut doc = self.conv.planned().json_fields();
        doc.insert("totalBytes".into(), self.conv.plan().total_bytes().into());
        let outputs: Vec<_> =
            self.conv.files().iter().map(|f| serde_json::json!({"name": f.name, "size": f.size})).collect();
        doc.insert("outputs".into(), outputs.into());
        serde_json::Value::Object(doc).to_string()
    }

    /// The next piece: `{kind: "begin", name, size}`, `{kind: "data", bytes}` (a fresh `Uint8Array` the
    /// caller owns and may transfer), `{kind: "copy", file, name, offset, len}` (only with `options.copies`: the
    /// next `len` bytes of the output are bytes `offset..offset + len` of the Blob `file`, the input that messages
    /// call `name`), `{kind: "end"}`, or `null` when done.
    #[wasm_bindgen(js_name = next)]
    pub fn next_piece(&mut self) -> Result<JsValue, JsError> {
        let piece = self.puller.next_piece(&self.conv).map_err(js_err)?;
        let obj = js_sys::Object::new();
        let set = |k: &str, v: JsValue| js_sys::Reflect::set(&obj, &k.into(), &v).map(|_| ());
        match piece {
            None => return Ok(JsValue::NULL),
            Some(Piece::Begin { name, size }) => {
                set("kind", "begin".into()).ok();
                set("name", name.into()).ok();
                set("size", (size as f64).into()).ok();
            }
            Some(Piece::Bytes(b) | Piece::Data(b)) => {
                set("kind", "data".into()).ok();
                // A copy: the band buffer in wasm memory is reused by the next call.
                set("bytes", js_sys::Uint8Array::from(b).into()).ok();
            }
            Some(Piece::Copy { input, offset, len, .. }) => {
                let blob = self.blobs.as_ref().and_then(|b| b.get(input));
                let Some(blob) = blob else { return Err(JsError::new("internal: a copy from an unknown input")) };
                let name = self.conv.inputs().get(input).map(|i| i.name.as_str()).unwrap_or("");
                return Ok(copy_piece(blob, name, offset, len));
            }
            Some(Piece::Written(_)) => {
                return Err(JsError::new("internal: positional writes are off in the browser"));
            }
            Some(Piece::End) => set("kind", "end".into()).ok().unwrap_or(()),
        }
        Ok(obj.into())
    }

    /// Bytes of wasm linear memory in use now (it only grows), for reports.
    #[wasm_bindgen(js_name = memoryBytes)]
    pub fn memory_bytes() -> f64 {
        let mem: js_sys::WebAssembly::Memory = wasm_bindgen::memory().unchecked_into();
        let buf: js_sys::ArrayBuffer = mem.buffer().unchecked_into();
        buf.byte_length() as f64
    }
}

/// A `{kind: "copy", file, name, offset, len}` piece (see [`Job::next_piece`]).
fn copy_piece(blob: &JsValue, name: &str, offset: u64, len: u64) -> JsValue {
    let obj = js_sys::Object::new();
    for (k, v) in [
        ("kind", JsValue::from("copy")),
        ("file", blob.clone()),
        ("name", name.into()),
        ("offset", (offset as f64).into()),
        ("len", (len as f64).into()),
    ] {
        js_sys::Reflect::set(&obj, &k.into(), &v).ok();
    }
    obj.into()
}

/// Plans without converting: the plan JSON for `files` (and an optional base folder).
#[wasm_bindgen]
pub fn inspect(files: js_sys::Array, base: JsValue, options: JsValue) -> Result<String, JsError> {
    let opts = if options.is_object() { options } else { js_sys::Object::new().into() };
    let job = Job::new(files, base, opts)?;
    Ok(job.plan_json())
}

/// A safety report of one pickle-based file, as JSON (the CLI's `scan --json`, byte for byte): `file` is
/// `{path, file}`. Nothing in it is executed.
#[wasm_bindgen]
pub fn scan(file: JsValue) -> Result<String, JsError> {
    let files = js_sys::Array::of1(&file);
    let folder = JsFolder::from_js(&files, "")?;
    let Some(rel) = folder.files.keys().next().cloned() else {
        return Err(JsError::new("scan: no file given"));
    };
    let input = folder.open(&rel).map_err(js_err)?;
    let report = ckptconv::scan::scan(input).map_err(js_err)?;
    Ok(report.to_json())
}
