//! A torch.save writer: the zip layout torch >= 1.6 writes, loadable by `torch.load(weights_only=True)`.
//!
//! The object is a flat `{name: tensor}` dict pickled with protocol 2; each tensor has its own storage
//! entry, stored (not compressed) and 64-byte aligned through an `FB` padding extra field, as torch does.
//! CRC-32s are computed while the bytes stream and written in data descriptors, so nothing is buffered;
//! zip64 records appear only when an offset or size needs them. Output is deterministic.

use super::Sink;
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

enum Body {
    Bytes(Vec<u8>),
    Tensor(usize),
}

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

/// Streams the archive of `layout` into `sink` as one file named `name`; the caller commits.
pub fn write(
    plan: &Plan,
    layout: &TorchSaveLayout,
    name: &str,
    inputs: &[Input],
    sink: &mut dyn Sink,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    sink.begin(name, layout.size)?;
    let mut written = 0u64;
    let mut crcs = Vec::with_capacity(layout.entries.len());
    let mut bufs = BandBuffers::default();
    let mut band = Vec::new();
    let mut done = 0u64;
    for e in &layout.entries {
        let mut h = Vec::with_capacity(64 + e.name.len() + e.pad as usize);
        put32(&mut h, LOCAL_SIG);
        put16(&mut h, if e.zip64 { 45 } else { 20 });
        put16(&mut h, FLAG_DESCRIPTOR);
        put16(&mut h, 0); // stored
        put16(&mut h, 0);
        put16(&mut h, DOS_DATE);
        put32(&mut h, 0); // CRC and sizes follow in the descriptor
        put32(&mut h, 0);
        put32(&mut h, 0);
        put16(&mut h, e.name.len() as u16);
        put16(&mut h, 4 + e.pad);
        h.extend(e.name.as_bytes());
        put16(&mut h, 0x4246); // "FB": torch's alignment padding
        put16(&mut h, e.pad);
        h.extend(std::iter::repeat_n(b'Z', e.pad as usize));
        sink.write(&h)?;
        written += h.len() as u64;
        let mut crc = crc32fast::Hasher::new();
        match &e.body {
            Body::Bytes(b) => {
                crc.update(b);
                sink.write(b)?;
            }
            Body::Tensor(i) => {
                let t = &plan.tensors[*i];
                let esz = t.dtype.size() as u64;
                let step = t.band_elems();
                let mut start = 0u64;
                while start < t.numel() {
                    let count = step.min(t.numel() - start);
                    crate::plan::fit(&mut band, (count * esz) as usize);
                    t.read_band(inputs, start, count, &mut band, &mut bufs)?;
                    crc.update(&band);
                    sink.write(&band)?;
                    done += band.len() as u64;
                    progress(done);
                    start += count;
                }
                t.release(inputs);
            }
        }
        written += e.size;
        let crc = crc.finalize();
        let mut d = Vec::with_capacity(24);
        put32(&mut d, DESCRIPTOR_SIG);
        put32(&mut d, crc);
        if e.zip64 {
            put64(&mut d, e.size);
            put64(&mut d, e.size);
        } else {
            put32(&mut d, e.size as u32);
            put32(&mut d, e.size as u32);
        }
        sink.write(&d)?;
        written += d.len() as u64;
        crcs.push(crc);
    }
    let mut cd = Vec::new();
    for (e, crc) in layout.entries.iter().zip(&crcs) {
        let z = cdir_needs_zip64(e);
        put32(&mut cd, CDIR_SIG);
        put16(&mut cd, 45); // made by
        put16(&mut cd, if z || e.zip64 { 45 } else { 20 });
        put16(&mut cd, FLAG_DESCRIPTOR);
        put16(&mut cd, 0);
        put16(&mut cd, 0);
        put16(&mut cd, DOS_DATE);
        put32(&mut cd, *crc);
        let small = |v: u64| if z { 0xFFFF_FFFF } else { v as u32 };
        put32(&mut cd, small(e.size));
        put32(&mut cd, small(e.size));
        put16(&mut cd, e.name.len() as u16);
        put16(&mut cd, if z { 28 } else { 0 });
        put16(&mut cd, 0); // comment
        put16(&mut cd, 0); // disk
        put16(&mut cd, 0); // internal attributes
        put32(&mut cd, 0); // external attributes
        put32(&mut cd, small(e.header_at));
        cd.extend(e.name.as_bytes());
        if z {
            put16(&mut cd, 0x0001);
            put16(&mut cd, 24);
            put64(&mut cd, e.size);
            put64(&mut cd, e.size);
            put64(&mut cd, e.header_at);
        }
    }
    let cd_len = cd.len() as u64;
    let n = layout.entries.len() as u64;
    let end64 = layout.cd_at + cd_len >= 0xFFFF_FFFF || layout.cd_at >= 0xFFFF_FFFF || n >= 0xFFFF;
    if end64 {
        let z64_at = layout.cd_at + cd_len;
        put32(&mut cd, ZIP64_EOCD_SIG);
        put64(&mut cd, 44);
        put16(&mut cd, 45);
        put16(&mut cd, 45);
        put32(&mut cd, 0);
        put32(&mut cd, 0);
        put64(&mut cd, n);
        put64(&mut cd, n);
        put64(&mut cd, cd_len);
        put64(&mut cd, layout.cd_at);
        put32(&mut cd, ZIP64_LOCATOR_SIG);
        put32(&mut cd, 0);
        put64(&mut cd, z64_at);
        put32(&mut cd, 1);
    }
    put32(&mut cd, EOCD_SIG);
    put16(&mut cd, 0);
    put16(&mut cd, 0);
    let count16 = if end64 { 0xFFFF } else { n as u16 };
    put16(&mut cd, count16);
    put16(&mut cd, count16);
    put32(&mut cd, if end64 { 0xFFFF_FFFF } else { cd_len as u32 });
    put32(&mut cd, if end64 { 0xFFFF_FFFF } else { layout.cd_at as u32 });
    put16(&mut cd, 0);
    sink.write(&cd)?;
    written += cd.len() as u64;
    if written != layout.size {
        return Err(Error::new(ErrorKind::Output(format!(
            "internal size mismatch for {name}: planned {} bytes, wrote {written}",
            layout.size
        ))));
    }
    sink.end()
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
        let input = Input::new("x.pt", Box::new(bytes));
        let file = TorchFile::open(&input).unwrap();
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
