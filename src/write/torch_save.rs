//! A torch.save writer: the zip layout torch >= 1.6 writes, loadable by `torch.load(weights_only=True)`.
//!
//! The object is a flat `{name: tensor}` dict pickled with protocol 2; each tensor has its own storage
//! entry, stored (not compressed) and 64-byte aligned through an `FB` padding extra field, as torch does.
//! CRC-32s are computed while the bytes stream and written in data descriptors, so nothing is buffered;
//! zip64 records appear only when an offset or size needs them. Output is deterministic.

use super::Sink;
use super::puller::{OnePlan, OutputFile, Segment};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::io::Input;
use crate::plan::{BandBuffers, Plan, PlannedTensor};

const ALIGN: u64 = 64;
const LOCAL_SIG: u32 = 0x0403_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const CDIR_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
/// Bit 3: sizes and CRC follow the data in a descriptor.
const FLAG_DESCRIPTOR: u16 = 0x0008;
/// 1980-01-01 00:00, the earliest DOS date: fixed so the output is deterministic.
const DOS_DATE: u16 = 0x0021;

#[derive(Debug, Clone)]
enum Body {
    Bytes(Vec<u8>),
    Tensor(usize),
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    body: Body,
    size: u64,
    /// Offset of the local header.
    header_at: u64,
    /// Padding bytes in the FB extra field.
    pad: u16,
    zip64: bool,
}

/// A planned torch.save file: every entry's place is known before a byte is written.
#[derive(Debug, Clone)]
pub struct TorchSaveLayout {
    entries: Vec<Entry>,
    /// Where the central directory starts.
    cd_at: u64,
    /// Exact file size.
    pub size: u64,
}

fn storage_global(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F64 => "DoubleStorage",
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::I16 => "ShortStorage",
        DType::I8 => "CharStorage",
        DType::U8 => "ByteStorage",
        DType::Bool => "BoolStorage",
        _ => return None,
    })
}

/// Protocol-2 pickle writer for the few opcodes a state dict needs.
struct Pickler(Vec<u8>);

impl Pickler {
    fn int(&mut self, v: u64) {
        if v < 256 {
            self.0.extend([b'K', v as u8]);
        } else if v < 65536 {
            self.0.push(b'M');
            self.0.extend((v as u16).to_le_bytes());
        } else if v < (1 << 31) {
            self.0.push(b'J');
            self.0.extend((v as u32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, with a zero byte when the top bit is set.
            let mut b = v.to_le_bytes().to_vec();
            while b.len() > 1 && b[b.len() - 1] == 0 && b[b.len() - 2] & 0x80 == 0 {
                b.pop();
            }
            if b[b.len() - 1] & 0x80 != 0 {
                b.push(0);
            }
            self.0.extend([0x8a, b.len() as u8]);
            self.0.extend(b);
        }
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend(name.as_bytes());
        self.0.push(b'\n');
    }
    fn tuple_of(&mut self, vals: &[u64]) {
        self.0.push(b'(');
        for &v in vals {
            self.int(v);
        }
        self.0.push(b't');
    }
    /// `_rebuild_tensor_v2/v3(storage, 0, size, stride, False, OrderedDict()[, dtype])`.
    fn tensor(&mut self, key: &str, t: &PlannedTensor) {
        let typed = storage_global(t.dtype);
        self.global("torch._utils", if typed.is_some() { "_rebuild_tensor_v2" } else { "_rebuild_tensor_v3" });
        self.0.push(b'(');
        self.0.push(b'(');
        self.str("storage");
        match typed {
            Some(cls) => {
                self.global("torch", cls);
                self.str(key);
                self.str("cpu");
                self.int(t.numel());
            }
            None => {
                // Types without a typed storage class use an untyped storage counted in bytes, as torch does.
                self.global("torch.storage", "UntypedStorage");
                self.str(key);
                self.str("cpu");
                self.int(t.nbytes());
            }
        }
        self.0.push(b't');
        self.0.push(b'Q');
        self.int(0);
        self.tuple_of(&t.shape);
        let mut strides = vec![1u64; t.shape.len()];
        for d in (0..t.shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * t.shape[d + 1];
        }
        self.tuple_of(&strides);
        self.0.push(0x89);
        self.global("collections", "OrderedDict");
        self.0.extend([b')', b'R']);
        if typed.is_none() {
            self.global("torch", t.dtype.torch_name());
        }
        self.0.push(b't');
        self.0.push(b'R');
    }
}

fn data_pkl(plan: &Plan) -> Vec<u8> {
    let mut p = Pickler(vec![0x80, 2, b'}', b'(']);
    for (i, t) in plan.tensors.iter().enumerate() {
        p.str(&t.name);
        p.tensor(&i.to_string(), t);
    }
    p.0.extend([b'u', b'.']);
    p.0
}

/// A deterministic 40-digit id derived from the tensor names and shapes (torch only stores it).
fn serialization_id(plan: &Plan) -> String {
    let mut h = crc32fast::Hasher::new();
    for t in &plan.tensors {
        h.update(t.name.as_bytes());
        for d in &t.shape {
            h.update(&d.to_le_bytes());
        }
    }
    format!("{:040}", h.finalize())
}

impl TorchSaveLayout {
    /// Lays out the archive for `plan` with entries under `root/`.
    pub fn new(plan: &Plan, root: &str) -> Result<TorchSaveLayout> {
        if plan.tensors.is_empty() {
            return Err(Error::new(ErrorKind::NoTensors("the plan is empty".into())));
        }
        let mut bodies: Vec<(String, Body, u64)> = Vec::new();
        let mut small = |name: &str, bytes: Vec<u8>| {
            let n = bytes.len() as u64;
            bodies.push((format!("{root}/{name}"), Body::Bytes(bytes), n));
        };
        small("data.pkl", data_pkl(plan));
        small(".format_version", b"1".to_vec());
        small(".storage_alignment", b"64".to_vec());
        small("byteorder", b"little".to_vec());
        for (i, t) in plan.tensors.iter().enumerate() {
            bodies.push((format!("{root}/data/{i}"), Body::Tensor(i), t.nbytes()));
        }
        let mut tail = |name: &str, bytes: Vec<u8>| {
            let n = bytes.len() as u64;
            bodies.push((format!("{root}/{name}"), Body::Bytes(bytes), n));
        };
        tail("version", b"3\n".to_vec());
        tail(".data/serialization_id", serialization_id(plan).into_bytes());
        let mut at = 0u64;
        let mut entries = Vec::with_capacity(bodies.len());
        for (name, body, size) in bodies {
            let zip64 = size >= 0xFFFF_FFFF || at >= 0xFFFF_FFFF;
            let fixed = 30 + name.len() as u64 + 4;
            let pad = ((ALIGN - (at + fixed) % ALIGN) % ALIGN) as u16;
            let data_at = at + fixed + pad as u64;
            let descriptor = if zip64 { 24 } else { 16 };
            entries.push(Entry { name, body, size, header_at: at, pad, zip64 });
            at = data_at + size + descriptor;
        }
        let cd_at = at;
        let mut cd_len = 0u64;
        for e in &entries {
            cd_len += 46 + e.name.len() as u64 + if cdir_needs_zip64(e) { 4 + 24 } else { 0 };
        }
        let end64 = cd_at + cd_len >= 0xFFFF_FFFF || cd_at >= 0xFFFF_FFFF || entries.len() >= 0xFFFF;
        let size = cd_at + cd_len + if end64 { 56 + 20 } else { 0 } + 22;
        Ok(TorchSaveLayout { entries, cd_at, size })
    }
}

fn cdir_needs_zip64(e: &Entry) -> bool {
    e.size >= 0xFFFF_FFFF || e.header_at >= 0xFFFF_FFFF
}

fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend(x.to_le_bytes());
}
fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend(x.to_le_bytes());
}
fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend(x.to_le_bytes());
}

/// Where a torch.save archive's streaming is: the entry, its phase, the running CRC and the CRCs so far.
#[derive(Default)]
pub struct ZipStep {
    entry: usize,
    phase: Phase,
    start: u64,
    crc: crc32fast::Hasher,
    crcs: Vec<u32>,
}

#[derive(Default, Clone, Copy)]
enum Phase {
    #[default]
    Local,
    Body,
    Descriptor,
    Directory,
    Done,
}

/// What [`TorchSaveLayout::step`] put out.
pub enum ZipOut {
    /// Record bytes, in the scratch buffer.
    Bytes,
    /// Tensor bytes, in the band buffer.
    Data,
    /// The archive is complete.
    Done,
}

impl TorchSaveLayout {
    /// The next bytes of the archive: local headers, small entries and data descriptors in `scratch`, tensor bands
    /// in `band` (their CRC taken as they pass), then the central directory. Deterministic, and exactly
    /// [`TorchSaveLayout::size`] bytes in all.
    pub(crate) fn step(
        &self,
        z: &mut ZipStep,
        plan: &Plan,
        inputs: &[Input],
        scratch: &mut Vec<u8>,
        band: &mut Vec<u8>,
        bufs: &mut BandBuffers,
    ) -> Result<ZipOut> {
        loop {
            match z.phase {
                Phase::Done => return Ok(ZipOut::Done),
                Phase::Directory => {
                    scratch.clear();
                    self.central_directory(&z.crcs, scratch);
                    z.phase = Phase::Done;
                    return Ok(ZipOut::Bytes);
                }
                Phase::Local => {
                    let Some(e) = self.entries.get(z.entry) else {
                        z.phase = Phase::Directory;
                        continue;
                    };
                    scratch.clear();
                    local_header(e, scratch);
                    z.crc = crc32fast::Hasher::new();
                    z.start = 0;
                    z.phase = Phase::Body;
                    if let Body::Bytes(b) = &e.body {
                        // A small entry goes out in one piece with its header and descriptor.
                        z.crc.update(b);
                        scratch.extend_from_slice(b);
                        self.finish_entry(z, scratch);
                    }
                    return Ok(ZipOut::Bytes);
                }
                Phase::Body => {
                    let Some(Entry { body: Body::Tensor(i), .. }) = self.entries.get(z.entry) else {
                        z.phase = Phase::Descriptor;
                        continue;
                    };
                    let t = plan.tensors.get(*i).ok_or_else(|| {
                        Error::new(ErrorKind::Output(format!("internal: the archive names a missing tensor {i}")))
                    })?;
                    if z.start >= t.numel() {
                        t.release(inputs);
                        z.phase = Phase::Descriptor;
                        continue;
                    }
                    let count = t.band_elems().min(t.numel() - z.start);
                    crate::plan::fit(band, (count * t.dtype.size() as u64) as usize);
                    t.read_band(inputs, z.start, count, band, bufs)?;
                    z.crc.update(band);
                    z.start += count;
                    return Ok(ZipOut::Data);
                }
                Phase::Descriptor => {
                    scratch.clear();
                    self.finish_entry(z, scratch);
                    return Ok(ZipOut::Bytes);
                }
            }
        }
    }

    /// Appends the current entry's data descriptor to `out` and moves to the next entry.
    fn finish_entry(&self, z: &mut ZipStep, out: &mut Vec<u8>) {
        let crc = std::mem::take(&mut z.crc).finalize();
        if let Some(e) = self.entries.get(z.entry) {
            put32(out, DESCRIPTOR_SIG);
            put32(out, crc);
            if e.zip64 {
                put64(out, e.size);
                put64(out, e.size);
            } else {
                put32(out, e.size as u32);
                put32(out, e.size as u32);
            }
        }
        z.crcs.push(crc);
        z.entry += 1;
        z.phase = Phase::Local;
    }

    /// The central directory and end records, from every entry's CRC.
    fn central_directory(&self, crcs: &[u32], cd: &mut Vec<u8>) {
        for (e, crc) in self.entries.iter().zip(crcs) {
            let z = cdir_needs_zip64(e);
            put32(cd, CDIR_SIG);
            put16(cd, 45); // made by
            put16(cd, if z || e.zip64 { 45 } else { 20 });
            put16(cd, FLAG_DESCRIPTOR);
            put16(cd, 0);
            put16(cd, 0);
            put16(cd, DOS_DATE);
            put32(cd, *crc);
            let small = |v: u64| if z { 0xFFFF_FFFF } else { v as u32 };
            put32(cd, small(e.size));
            put32(cd, small(e.size));
            put16(cd, e.name.len() as u16);
            put16(cd, if z { 28 } else { 0 });
            put16(cd, 0); // comment
            put16(cd, 0); // disk
            put16(cd, 0); // internal attributes
            put32(cd, 0); // external attributes
            put32(cd, small(e.header_at));
            cd.extend(e.name.as_bytes());
            if z {
                put16(cd, 0x0001);
                put16(cd, 24);
                put64(cd, e.size);
                put64(cd, e.size);
                put64(cd, e.header_at);
            }
        }
        let cd_len = cd.len() as u64;
        let n = self.entries.len() as u64;
        let end64 = self.cd_at + cd_len >= 0xFFFF_FFFF || self.cd_at >= 0xFFFF_FFFF || n >= 0xFFFF;
        if end64 {
            let z64_at = self.cd_at + cd_len;
            put32(cd, ZIP64_EOCD_SIG);
            put64(cd, 44);
            put16(cd, 45);
            put16(cd, 45);
            put32(cd, 0);
            put32(cd, 0);
            put64(cd, n);
            put64(cd, n);
            put64(cd, cd_len);
            put64(cd, self.cd_at);
            put32(cd, ZIP64_LOCATOR_SIG);
            put32(cd, 0);
            put64(cd, z64_at);
            put32(cd, 1);
        }
        put32(cd, EOCD_SIG);
        put16(cd, 0);
        put16(cd, 0);
        let count16 = if end64 { 0xFFFF } else { n as u16 };
        put16(cd, count16);
        put16(cd, count16);
        put32(cd, if end64 { 0xFFFF_FFFF } else { cd_len as u32 });
        put32(cd, if end64 { 0xFFFF_FFFF } else { self.cd_at as u32 });
        put16(cd, 0);
    }
}

/// An entry's local header, with torch's `FB` alignment padding.
fn local_header(e: &Entry, h: &mut Vec<u8>) {
    put32(h, LOCAL_SIG);
    put16(h, if e.zip64 { 45 } else { 20 });
    put16(h, FLAG_DESCRIPTOR);
    put16(h, 0); // stored
    put16(h, 0);
    put16(h, DOS_DATE);
    put32(h, 0); // CRC and sizes follow in the descriptor
    put32(h, 0);
    put32(h, 0);
    put16(h, e.name.len() as u16);
    put16(h, 4 + e.pad);
    h.extend(e.name.as_bytes());
    put16(h, 0x4246); // "FB": torch's alignment padding
    put16(h, e.pad);
    h.extend(std::iter::repeat_n(b'Z', e.pad as usize));
}

/// Streams the archive of `layout` into `sink` as one file named `name`, through the one puller; the caller
/// commits.
pub fn write(
    plan: &Plan,
    layout: &TorchSaveLayout,
    name: &str,
    inputs: &[Input],
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let file = layout.clone().into_output_file(name, 0);
    super::puller::drive(&OnePlan { files: vec![file], plan, inputs }, sink, progress)
}

impl TorchSaveLayout {
    /// This archive as output file `name`, of plan `plan` of an output set.
    pub fn into_output_file(self, name: &str, plan: usize) -> OutputFile {
        OutputFile {
            name: name.to_string(),
            size: self.size,
            segments: vec![Segment::TorchSave { plan, layout: Box::new(self) }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Source, StridedView};
    use crate::torch::TorchFile;
    use crate::write::MemorySink;

    #[test]
    fn round_trips_through_our_own_reader() {
        let data: Vec<u8> = (0..64u8).collect();
        let inputs = vec![Input::new("mem", Box::new(data.clone()))];
        let mk = |name: &str, dtype: DType, shape: Vec<u64>, strides: Vec<u64>| {
            let v = StridedView::new(name, 0, 0, 64, dtype, 0, shape.clone(), strides, 64).unwrap();
            PlannedTensor::from_source(name.into(), shape, Source::View(v), None)
        };
        let plan = Plan {
            tensors: vec![mk("a.w", DType::F32, vec![2, 3], vec![3, 1]), mk("f8", DType::F8E4M3, vec![5], vec![1])],
            notes: vec![],
        };
        let layout = TorchSaveLayout::new(&plan, "archive").unwrap();
        let mut sink = MemorySink::default();
        write(&plan, &layout, "x.pt", &inputs, &mut sink, &mut |_| {}).unwrap();
        sink.commit().unwrap();
        let bytes = sink.files.remove("x.pt").unwrap();
        assert_eq!(bytes.len() as u64, layout.size);
        let mut input = Input::new("x.pt", Box::new(bytes));
        let file = TorchFile::open(&mut input).unwrap();
        let found = file.tensors(&input, 0).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].path.name, "a.w");
        assert_eq!(found[0].view.shape, vec![2, 3]);
        assert_eq!(found[0].view.data_start % 64, 0);
        let mut got = vec![0u8; 24];
        input.read_exact_at(found[0].view.data_start, &mut got).unwrap();
        assert_eq!(got, data[..24]);
        assert_eq!(found[1].view.dtype, DType::F8E4M3);
    }

    #[test]
    fn long_ints_pickle_as_long1() {
        let mut p = Pickler(Vec::new());
        p.int(1 << 40);
        assert_eq!(p.0, [0x8a, 6, 0, 0, 0, 0, 0, 1]);
        let mut p = Pickler(Vec::new());
        p.int(0x80_0000_0000);
        assert_eq!(p.0, [0x8a, 6, 0, 0, 0, 0, 0x80, 0]);
    }
}
