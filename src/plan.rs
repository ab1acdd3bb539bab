//! The plan: every output tensor with its name, dtype, shape and the views its bytes come from.
//!
//! A plan is built from metadata alone. Writers pull each tensor in bands of bounded size through
//! [`PlannedTensor::read_band`], so peak memory does not depend on tensor or model size.

use crate::dtype::{self, DType};
use crate::error::{Error, ErrorKind, Result, tensor_err};
use crate::io::Input;

/// Sizes a reusable buffer to `n` bytes. Capacity grows to exactly what is asked, never doubled (a Vec's
/// amortized growth would turn a 16 MiB band into a 32 MiB allocation), and only new bytes are zeroed.
pub fn fit(v: &mut Vec<u8>, n: usize) {
    if v.capacity() < n {
        v.reserve_exact(n - v.len());
    }
    v.resize(n, 0);
}

/// Largest band a writer pulls at once, in bytes.
pub const BAND_BYTES: usize = 16 << 20;
/// Largest window of source bytes cached for gathering non-contiguous views.
const WINDOW_BYTES: u64 = 32 << 20;

/// A torch-style view: `shape` and `strides` (in elements) over a storage at `data_start` in an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StridedView {
    /// Index of the input that holds the storage.
    pub input: usize,
    /// Absolute byte offset of storage element 0.
    pub data_start: u64,
    /// Storage length in bytes.
    pub storage_bytes: u64,
    /// Element type.
    pub dtype: DType,
    /// Offset of the view's first element, in elements.
    pub offset: u64,
    /// Logical shape.
    pub shape: Vec<u64>,
    /// Strides in elements.
    pub strides: Vec<u64>,
    numel: u64,
    contiguous: bool,
}

impl StridedView {
    /// Checks a view against its storage with overflow-safe arithmetic.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        input: usize,
        data_start: u64,
        storage_bytes: u64,
        dtype: DType,
        offset: u64,
        shape: Vec<u64>,
        strides: Vec<u64>,
        max_dims: usize,
    ) -> Result<Self> {
        if shape.len() > max_dims {
            return Err(tensor_err(name, format!("{} dimensions (at most {max_dims} allowed)", shape.len())));
        }
        if shape.len() != strides.len() {
            return Err(tensor_err(name, "shape and stride lengths differ"));
        }
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| tensor_err(name, format!("shape {shape:?} overflows")))?;
        let esz = dtype.size() as u64;
        numel.checked_mul(esz).ok_or_else(|| tensor_err(name, format!("shape {shape:?} overflows")))?;
        if numel > 0 {
            let last = shape
                .iter()
                .zip(&strides)
                .try_fold(offset, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
            let end = last
                .and_then(|l| l.checked_add(1))
                .and_then(|n| n.checked_mul(esz))
                .ok_or_else(|| tensor_err(name, "view extent overflows"))?;
            if end > storage_bytes {
                return Err(tensor_err(
                    name,
                    format!(
                        "view (offset {offset}, shape {shape:?}, strides {strides:?}) reaches byte {end} of a {storage_bytes}-byte storage"
                    ),
                ));
            }
        }
        let mut expect = 1u64;
        let mut contiguous = true;
        for (&d, &s) in shape.iter().zip(&strides).rev() {
            if d != 1 && s != expect {
                contiguous = false;
            }
            expect = expect.saturating_mul(d);
        }
        Ok(StridedView { input, data_start, storage_bytes, dtype, offset, shape, strides, numel, contiguous })
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.numel
    }

    /// Row `i` of dimension 0, without that dimension (one layer of a stacked `[layers, ...]` tensor).
    pub fn layer(&self, name: &str, i: u64) -> Result<StridedView> {
        let row = self.rows(name, i, i + 1)?;
        StridedView::new(
            name,
            row.input,
            row.data_start,
            row.storage_bytes,
            row.dtype,
            row.offset,
            row.shape[1..].to_vec(),
            row.strides[1..].to_vec(),
            usize::MAX,
        )
    }

    /// The sub-view of rows `[a, b)` of dimension 0.
    pub fn rows(&self, name: &str, a: u64, b: u64) -> Result<StridedView> {
        let Some(&n) = self.shape.first() else {
            return Err(tensor_err(name, "a 0-d tensor has no rows"));
        };
        if a > b || b > n {
            return Err(tensor_err(name, format!("rows {a}..{b} of a tensor with {n}")));
        }
        let mut shape = self.shape.clone();
        shape[0] = b - a;
        let offset = a.checked_mul(self.strides[0]).and_then(|x| x.checked_add(self.offset));
        let offset = offset.ok_or_else(|| tensor_err(name, "row offset overflows"))?;
        StridedView::new(
            name,
            self.input,
            self.data_start,
            self.storage_bytes,
            self.dtype,
            offset,
            shape,
            self.strides.clone(),
            usize::MAX,
        )
    }

    /// Whether the view's elements are one contiguous run of its storage.
    pub fn is_contiguous(&self) -> bool {
        self.contiguous
    }

    /// Reads elements `[start, start + count)` in row-major order into `out` (`count * esize` bytes).
    pub(crate) fn read(
        &self,
        inputs: &[Input],
        start: u64,
        count: u64,
        out: &mut [u8],
        window: &mut Window,
    ) -> Result<()> {
        let input = inputs
            .get(self.input)
            .ok_or_else(|| Error::new(ErrorKind::Output(format!("plan refers to missing input {}", self.input))))?;
        let esz = self.dtype.size() as u64;
        if count == 0 {
            return Ok(());
        }
        if self.contiguous {
            let at = self.data_start + (self.offset + start) * esz;
            return input.read_exact_at(at, out);
        }
        if let Some(done) = self.read_transposed(input, start, count, out, window)? {
            return Ok(done);
        }
        // General views: walk the innermost dimension run by run, through a cached source window.
        let ndim = self.shape.len();
        let inner = ndim - 1;
        let mut idx = vec![0u64; ndim];
        let mut rem = start;
        for d in (0..ndim).rev() {
            idx[d] = rem % self.shape[d];
            rem /= self.shape[d];
        }
        let e = esz as usize;
        let mut done = 0u64;
        while done < count {
            let run = (self.shape[inner] - idx[inner]).min(count - done);
            let base: u64 = self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<u64>();
            let s_in = self.strides[inner];
            let first = self.data_start + base * esz;
            let span = ((run - 1) * s_in + 1) * esz;
            let dst = &mut out[(done * esz) as usize..((done + run) * esz) as usize];
            if span <= WINDOW_BYTES {
                let src = window.get(input, self.input, first, span, self.data_start + self.storage_bytes)?;
                if s_in == 1 {
                    dst.copy_from_slice(src);
                } else {
                    let step = (s_in * esz) as usize;
                    for (k, o) in dst.chunks_exact_mut(e).enumerate() {
                        o.copy_from_slice(&src[k * step..k * step + e]);
                    }
                }
            } else {
                for (k, o) in dst.chunks_exact_mut(e).enumerate() {
                    let at = first + k as u64 * s_in * esz;
                    let src = window.get(input, self.input, at, esz, self.data_start + self.storage_bytes)?;
                    o.copy_from_slice(src);
                }
            }
            done += run;
            idx[inner] += run;
            for d in (1..ndim).rev() {
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
                idx[d - 1] += 1;
            }
        }
        Ok(())
    }
}

impl StridedView {
    /// A transposed matrix (2-d, unit stride on dim 0) read in source order: for each source row, the run of
    /// output rows in the band is contiguous in the storage, so a band costs one window pass over the source
    /// instead of one window load per element. Handles whole output rows; `None` leaves the rest to the
    /// general path.
    fn read_transposed(
        &self,
        input: &Input,
        start: u64,
        count: u64,
        out: &mut [u8],
        window: &mut Window,
    ) -> Result<Option<()>> {
        let ([n0, n1], [s0, s1]) = (self.shape.as_slice(), self.strides.as_slice()) else { return Ok(None) };
        let (n0, n1, s0, s1) = (*n0, *n1, *s0, *s1);
        if s0 != 1 || s1 <= 1 || n1 < 2 || !start.is_multiple_of(n1) || !count.is_multiple_of(n1) {
            return Ok(None);
        }
        let esz = self.dtype.size() as u64;
        let (ra, rb) = (start / n1, (start + count) / n1);
        let run = (rb - ra) * esz;
        if rb > n0 || run > WINDOW_BYTES {
            return Ok(None);
        }
        let e = esz as usize;
        let limit = self.data_start + self.storage_bytes;
        for j in 0..n1 {
            let at = self.data_start + (self.offset + ra * s0 + j * s1) * esz;
            let src = window.get(input, self.input, at, run, limit)?;
            for (i, chunk) in src.chunks_exact(e).enumerate() {
                let o = ((i as u64 * n1 + j) * esz) as usize;
                out[o..o + e].copy_from_slice(chunk);
            }
        }
        Ok(Some(()))
    }
}

/// A cache of one source byte range, reused across runs and bands of a non-contiguous view.
#[derive(Default)]
pub struct Window {
    input: usize,
    start: u64,
    buf: Vec<u8>,
}

impl Window {
    fn get(&mut self, input: &Input, input_index: usize, at: u64, len: u64, limit: u64) -> Result<&[u8]> {
        let hit = self.input == input_index
            && at >= self.start
            && at + len <= self.start + self.buf.len() as u64
            && !self.buf.is_empty();
        if !hit {
            let want = WINDOW_BYTES.min(limit.saturating_sub(at)).max(len);
            fit(&mut self.buf, want as usize);
            input.read_exact_at(at, &mut self.buf)?;
            self.input = input_index;
            self.start = at;
        }
        let off = (at - self.start) as usize;
        Ok(&self.buf[off..off + len as usize])
    }
}

/// One chunk of a [`ChunkedTensor`]: a box of the global tensor and the view holding its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Start of the box in each dimension.
    pub offsets: Vec<u64>,
    /// Extent of the box in each dimension (none zero).
    pub sizes: Vec<u64>,
    /// The chunk's elements, in the chunk's own row-major order.
    pub view: StridedView,
}

/// Checks that boxes `(offsets, sizes)` tile `shape` exactly: inside its bounds, no overlap, no gap.
pub fn check_tiling(name: &str, shape: &[u64], boxes: &[(&[u64], &[u64])]) -> Result<()> {
    let nd = shape.len();
    let numel =
        shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| tensor_err(name, "shape overflows"))?;
    let mut covered = 0u64;
    let mut seen: Vec<(&[u64], &[u64])> = Vec::new();
    for &(off, size) in boxes {
        if off.len() != nd || size.len() != nd {
            return Err(tensor_err(name, format!("chunk {off:?} has the wrong number of dimensions")));
        }
        if (0..nd).any(|d| off[d].checked_add(size[d]).is_none_or(|e| e > shape[d])) {
            return Err(tensor_err(
                name,
                format!("chunk at {off:?} of size {size:?} lies outside the shape {shape:?}"),
            ));
        }
        let vol = size.iter().product::<u64>();
        if vol == 0 {
            continue;
        }
        if let Some((o, _)) =
            seen.iter().find(|(o, s)| (0..nd).all(|d| off[d] < o[d] + s[d] && o[d] < off[d] + size[d]))
        {
            return Err(tensor_err(name, format!("chunks at {o:?} and {off:?} overlap")));
        }
        seen.push((off, size));
        covered += vol;
    }
    if covered != numel {
        return Err(tensor_err(
            name,
            format!("chunks cover {covered} of {numel} elements: the checkpoint has a gap (a missing rank?)"),
        ));
    }
    Ok(())
}

/// A global tensor assembled from chunks that tile it (DCP shards, later Megatron ranks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedTensor {
    shape: Vec<u64>,
    dtype: DType,
    chunks: Vec<Chunk>,
    /// Elements per row of dimension 0 (1 for 0-d and 1-d tensors).
    row: u64,
    /// Whether every chunk spans whole rows and is contiguous, so its rows are contiguous in the output.
    row_slabs: bool,
}

impl ChunkedTensor {
    /// The chunks, as built.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Builds a chunked tensor; the caller has checked that the chunks tile `shape` exactly.
    pub fn new(name: &str, shape: Vec<u64>, dtype: DType, mut chunks: Vec<Chunk>) -> Result<Self> {
        for c in &chunks {
            if c.view.dtype != dtype || c.sizes.len() != shape.len() {
                return Err(tensor_err(name, "chunk does not match the tensor's dtype or rank"));
            }
        }
        chunks.sort_by(|a, b| a.offsets.cmp(&b.offsets));
        let row = shape.iter().skip(1).product::<u64>().max(1);
        let row_slabs = chunks.iter().all(|c| c.view.is_contiguous() && c.sizes.get(1..) == shape.get(1..));
        Ok(ChunkedTensor { shape, dtype, chunks, row, row_slabs })
    }

    fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Global shape.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// Size in bytes.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// Reads output elements `[start, start + count)`; both must be whole rows of dimension 0.
    fn read(&self, inputs: &[Input], start: u64, count: u64, out: &mut [u8], bufs: &mut ChunkBuffers) -> Result<()> {
        let esz = self.dtype.size() as u64;
        let (r0, r1) = (start / self.row, (start + count) / self.row);
        let nd = self.shape.len();
        for c in &self.chunks {
            let (o0, s0) = match nd {
                0 => (0, 1),
                _ => (c.offsets[0], c.sizes[0]),
            };
            let (lo, hi) = (r0.max(o0), r1.min(o0 + s0));
            if lo >= hi {
                continue;
            }
            let local_row = c.sizes.iter().skip(1).product::<u64>().max(1);
            let local_start = (lo - o0) * local_row;
            let local_count = (hi - lo) * local_row;
            if nd <= 1 || c.sizes[1..] == self.shape[1..] {
                // Whole rows: the chunk's rows land contiguously in the output.
                let dst = ((lo * self.row - start) * esz) as usize;
                let len = (local_count * esz) as usize;
                c.view.read(inputs, local_start, local_count, &mut out[dst..dst + len], &mut bufs.window)?;
                continue;
            }
            fit(&mut bufs.rows, (local_count * esz) as usize);
            c.view.read(inputs, local_start, local_count, &mut bufs.rows, &mut bufs.window)?;
            // Scatter runs along the last dimension into their global positions.
            let last = nd - 1;
            let run = c.sizes[last];
            let mut gstride = vec![1u64; nd];
            for d in (0..last).rev() {
                gstride[d] = gstride[d + 1] * self.shape[d + 1];
            }
            let runs = local_count / run;
            let mut idx = vec![0u64; nd];
            idx[0] = lo - o0;
            for k in 0..runs {
                let g: u64 = (0..nd).map(|d| (c.offsets[d] + idx[d]) * gstride[d]).sum();
                let dst = ((g - start) * esz) as usize;
                let src = (k * run * esz) as usize;
                let len = (run * esz) as usize;
                out[dst..dst + len].copy_from_slice(&bufs.rows[src..src + len]);
                for d in (0..last).rev() {
                    idx[d] += 1;
                    if d == 0 || idx[d] < c.sizes[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
        }
        Ok(())
    }

    /// Input ranges that hold output elements `[start, start + count)` verbatim, in order, when every
    /// chunk is a contiguous slab of whole rows (FSDP's `Shard(0)`).
    fn verbatim_pieces(&self, start: u64, count: u64) -> Option<Vec<(usize, u64, u64)>> {
        if !self.row_slabs {
            return None;
        }
        let esz = self.dtype.size() as u64;
        let end = start + count;
        let mut pieces = Vec::new();
        for c in &self.chunks {
            let first = c.offsets.first().copied().unwrap_or(0) * self.row;
            let n = c.view.numel();
            let (lo, hi) = (start.max(first), end.min(first + n));
            if lo < hi {
                let v = &c.view;
                pieces.push((v.input, v.data_start + (v.offset + lo - first) * esz, (hi - lo) * esz));
            }
        }
        Some(pieces)
    }
}

/// A LoRA merge, `W + scale * B @ A`, computed per band of rows in f32 (rounded once by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraMerge {
    /// The base weight `W`, `[rows, cols]`.
    pub base: Source,
    /// `A`, `[rank, cols]`.
    pub a: Source,
    /// `B`, `[rows, rank]`.
    pub b: Source,
    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA).
    pub scale: f32,
    /// Rows of `W`.
    pub rows: u64,
    /// Columns of `W`.
    pub cols: u64,
    /// LoRA rank.
    pub rank: u64,
    /// Output element type: the f32 result is rounded once, straight to it.
    pub out: DType,
}

impl Eq for LoraMerge {}

impl LoraMerge {
    fn read(&self, inputs: &[Input], start: u64, count: u64, out: &mut [u8], bufs: &mut ChunkBuffers) -> Result<()> {
        self.run(inputs, start, count, Dest::Mem(out), bufs).map(|_| ())
    }

    /// Elements `[start, start + count)` (whole rows) into `dest`. A positional destination needs W readable by
    /// the workers themselves (else nothing is done and the answer is `false`: the caller goes band by band).
    fn run(&self, inputs: &[Input], start: u64, count: u64, dest: Dest, bufs: &mut ChunkBuffers) -> Result<bool> {
        let (cols, rank) = (self.cols as usize, self.rank as usize);
        let (r0, r1) = (start / self.cols, (start + count) / self.cols);
        let rows = (r1 - r0) as usize;
        let wsz = self.base.dtype().size();
        // A contiguous W in a file that can be shared is read by the workers themselves, block by block;
        // otherwise it is read here, whole, first.
        let shared = match &self.base {
            Source::View(v) if v.is_contiguous() => inputs.get(v.input).and_then(|i| {
                let reader = i.data.sendable()?;
                Some((i.name.as_str(), reader, v.data_start + (v.offset + start) * wsz as u64))
            }),
            _ => None,
        };
        if shared.is_none() && matches!(dest, Dest::File { .. }) {
            return Ok(false);
        }
        // A is read once per tensor and kept in f32.
        let key = self as *const LoraMerge as usize;
        if bufs.lora_a.0 != key {
            let n = self.rank * self.cols;
            let mut raw = std::mem::take(&mut bufs.lora_small);
            fit(&mut raw, (n * self.a.dtype().size() as u64) as usize);
            self.a.read(inputs, 0, n, &mut raw, bufs)?;
            let mut a = std::mem::take(&mut bufs.lora_a.1);
            a.resize(n as usize, 0.0);
            dtype::widen_to_f32(self.a.dtype(), &raw, &mut a);
            bufs.lora_a = (key, a);
            bufs.lora_small = raw;
        }
        // B's rows for this band, times the scale (exact for alpha = r; the same rounding everywhere otherwise).
        let nb = (r1 - r0) * self.rank;
        let mut raw = std::mem::take(&mut bufs.lora_small);
        fit(&mut raw, (nb * self.b.dtype().size() as u64) as usize);
        self.b.read(inputs, r0 * self.rank, nb, &mut raw, bufs)?;
        let mut b = std::mem::take(&mut bufs.lora_b);
        b.resize(nb as usize, 0.0);
        dtype::widen_to_f32(self.b.dtype(), &raw, &mut b);
        bufs.lora_small = raw;
        for c in b.iter_mut() {
            *c *= self.scale;
        }
        let mut raw = std::mem::take(&mut bufs.lora_raw);
        if shared.is_none() {
            fit(&mut raw, (count as usize) * wsz);
            self.base.read(inputs, start, count, &mut raw, bufs)?;
        }
        let w = match &shared {
            Some((name, reader, offset)) => WRows::File { name, reader: &**reader, offset: *offset },
            None => WRows::Mem(&raw),
        };
        let a = std::mem::take(&mut bufs.lora_a.1);
        let sizes_agree = b.len() == rows * rank
            && a.len() == rank * cols
            && (shared.is_some() || raw.len() == rows * cols * wsz)
            && match &dest {
                Dest::Mem(out) => out.len() == rows * cols * self.out.size(),
                Dest::File { .. } => true,
            };
        let result = if sizes_agree {
            let band = Band { w, w_dtype: self.base.dtype(), coef: &b, a: &a, rank, cols, out_dtype: self.out };
            lora_band(&band, rows, dest).map(|_| true)
        } else {
            Err(Error::new(ErrorKind::Output("internal: LoRA band sizes disagree".into())))
        };
        bufs.lora_a.1 = a;
        bufs.lora_raw = raw;
        bufs.lora_b = b;
        result
    }
}

/// Where a band's result goes: a buffer, or straight to its place in the output file (each worker writes its
/// own blocks; `offset` is where the band's first element goes).
enum Dest<'a> {
    Mem(&'a mut [u8]),
    File { target: &'a crate::io::Positional, offset: u64 },
}

/// Where a band's W rows are: already in memory, or in a file each worker reads its own blocks from.
enum WRows<'a> {
    Mem(&'a [u8]),
    File { name: &'a str, reader: &'a (dyn crate::io::ReadAt + Send + Sync), offset: u64 },
}

/// One band of a LoRA merge: `out = narrow(widen(w) + coef @ a)`, row-major.
struct Band<'a> {
    w: WRows<'a>,
    w_dtype: DType,
    coef: &'a [f32],
    a: &'a [f32],
    rank: usize,
    cols: usize,
    out_dtype: DType,
}

/// Runs a band in blocks of rows small enough (about 256 KiB of f32) that reading, widening, merging and
/// narrowing a block all happen in one core's cache. Natively two workers take blocks from a shared queue, so
/// they stay balanced while the writer thread takes its share of the CPU; every element is computed the same
/// way whoever computes it.
fn lora_band(band: &Band, rows: usize, dest: Dest) -> Result<()> {
    let cols = band.cols;
    if cols == 0 {
        return Ok(());
    }
    let osz = band.out_dtype.size();
    let block = ((256 << 10) / (cols * 4)).max(1).next_multiple_of(4);
    type Blocks<'b> = Box<dyn Iterator<Item = (usize, Option<&'b mut [u8]>)> + Send + 'b>;
    let (blocks, target): (Blocks, _) = match dest {
        Dest::Mem(out) => (Box::new(out.chunks_mut(block * cols * osz).map(Some).enumerate()), None),
        Dest::File { target, offset } => {
            (Box::new((0..rows.div_ceil(block)).map(|i| (i, None))), Some((target, offset)))
        }
    };
    let queue = std::sync::Mutex::new(blocks);
    let work = || -> Result<()> {
        let (mut wbuf, mut acc, mut obuf) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            // A poisoned queue means the other worker panicked; the scope re-raises that panic.
            let Some((i, slot)) = queue.lock().ok().and_then(|mut q| q.next()) else { return Ok(()) };
            let first = i * block;
            match (slot, target) {
                (Some(out), _) => lora_block(band, first, out, &mut wbuf, &mut acc)?,
                (None, Some((t, offset))) => {
                    fit(&mut obuf, block.min(rows - first) * cols * osz);
                    lora_block(band, first, &mut obuf, &mut wbuf, &mut acc)?;
                    let at = offset + (first * cols * osz) as u64;
                    t.file.write_all_at(at, &obuf).map_err(|e| {
                        Error::new(ErrorKind::Output(format!("writing at byte {at}: {e}"))).in_file(&t.name)
                    })?;
                }
                (None, None) => return Ok(()),
            }
        }
    };
    #[cfg(not(target_family = "wasm"))]
    if rows >= 64 {
        return std::thread::scope(|s| {
            let other = s.spawn(work);
            let mine = work();
            let theirs = other.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            mine.and(theirs)
        });
    }
    work()
}

/// The rows of a band that `out` holds, from row `first`; `wbuf` and `acc` are the worker's scratch buffers.
fn lora_block(band: &Band, first: usize, out: &mut [u8], wbuf: &mut Vec<u8>, acc: &mut Vec<f32>) -> Result<()> {
    let (cols, rank) = (band.cols, band.rank);
    let rows = out.len() / (cols * band.out_dtype.size());
    let wsz = band.w_dtype.size();
    let w: &[u8] = match band.w {
        WRows::Mem(raw) => &raw[first * cols * wsz..(first + rows) * cols * wsz],
        WRows::File { name, reader, offset } => {
            fit(wbuf, rows * cols * wsz);
            crate::io::read_exact_named(name, reader, offset + (first * cols * wsz) as u64, wbuf)?;
            wbuf
        }
    };
    let coef = &band.coef[first * rank..(first + rows) * rank];
    #[cfg(target_arch = "x86_64")]
    if band.w_dtype == DType::BF16 && band.out_dtype == DType::BF16 && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        unsafe { lora_rows_avx512_bf16(w, coef, band.a, rank, cols, out) };
        return Ok(());
    }
    acc.resize(rows * cols, 0.0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe {
            widen_avx2(band.w_dtype, w, acc);
            lora_rows(acc, coef, band.a, rank, cols);
            narrow_avx2(acc, band.out_dtype, out);
        }
        return Ok(());
    }
    dtype::widen_to_f32(band.w_dtype, w, acc);
    lora_rows(acc, coef, band.a, rank, cols);
    dtype::narrow_from_f32(acc, band.out_dtype, out);
    Ok(())
}

/// [`dtype::widen_to_f32`] compiled with AVX2 (the same element function, in wider vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_avx2(src: DType, input: &[u8], out: &mut [f32]) {
    dtype::widen_to_f32(src, input, out);
}

/// [`dtype::narrow_from_f32`] compiled with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn narrow_avx2(values: &[f32], dst: DType, out: &mut [u8]) {
    dtype::narrow_from_f32(values, dst, out);
}

/// `acc += coef @ a` with a fixed order of operations: every element adds its rank terms one by one, in
/// order, as separate multiplies and adds (never fused). The result is therefore the same bits on every
/// target and whatever the vector width, so native, WASI and browser outputs stay byte-identical.
fn lora_rows(acc: &mut [f32], coef: &[f32], a: &[f32], rank: usize, cols: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        unsafe { lora_rows_avx512(acc, coef, a, rank, cols) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { lora_rows_avx2(acc, coef, a, rank, cols) };
        return;
    }
    lora_rows_plain(acc, coef, a, rank, cols);
}

/// Defines a register-blocked kernel: a 4-row x (`$nv` vectors of `$lanes`) tile of `acc` lives in registers while
/// the rank loop runs, so each element still gets `acc = acc + c_k * a_kj` for k = 0, 1, ... in order, as separate
/// multiplies and adds (no FMA): the same bits as [`lora_rows_plain`], with the loads and stores of `acc` done once
/// instead of `rank` times. Columns are taken in blocks of `$block` so that the block of A stays in L1.
macro_rules! lora_kernel {
    ($(#[$doc:meta])* $name:ident, $feature:literal, $lanes:literal, $nv:literal, $block:literal,
     $zero:ident, $load:ident, $store:ident, $set1:ident, $add:ident, $mul:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(acc: &mut [f32], coef: &[f32], a: &[f32], rank: usize, cols: usize) {
            use std::arch::x86_64::*;
            const WIDE: usize = $lanes * $nv;
            let rows = acc.len() / cols;
            let groups = rows / 4;
            assert!(coef.len() >= rows * rank && a.len() >= rank * cols);
            let (accp, cp, ap) = (acc.as_mut_ptr(), coef.as_ptr(), a.as_ptr());
            for jb in (0..cols).step_by($block) {
                let je = (jb + $block).min(cols);
                let wide_end = jb + (je - jb) / WIDE * WIDE;
                for g in 0..groups {
                    let r = g * 4;
                    let mut j = jb;
                    while j < wide_end {
                        // SAFETY: rows r..r+4 exist (g < rows / 4) and columns j..j+WIDE lie inside the row
                        // (j + WIDE <= je <= cols); A holds rank rows of cols columns and coef rows x rank values
                        // (asserted above).
                        unsafe {
                            let o = [
                                accp.add(r * cols + j),
                                accp.add((r + 1) * cols + j),
                                accp.add((r + 2) * cols + j),
                                accp.add((r + 3) * cols + j),
                            ];
                            let mut t = [[$zero(); $nv]; 4];
                            for (ti, &op) in t.iter_mut().zip(&o) {
                                for (v, tv) in ti.iter_mut().enumerate() {
                                    *tv = $load(op.add($lanes * v));
                                }
                            }
                            for k in 0..rank {
                                let ak = ap.add(k * cols + j);
                                let mut av = [$zero(); $nv];
                                for (v, x) in av.iter_mut().enumerate() {
                                    *x = $load(ak.add($lanes * v));
                                }
                                for (i, ti) in t.iter_mut().enumerate() {
                                    let c = $set1(*cp.add((r + i) * rank + k));
                                    for (tv, &x) in ti.iter_mut().zip(&av) {
                                        *tv = $add(*tv, $mul(c, x));
                                    }
                                }
                            }
                            for (ti, &op) in t.iter().zip(&o) {
                                for (v, tv) in ti.iter().enumerate() {
                                    $store(op.add($lanes * v), *tv);
                                }
                            }
                        }
                        j += WIDE;
                    }
                    // Columns left over in this block: one element at a time, same order.
                    for row in r..r + 4 {
                        f32_tail(acc, coef, a, rank, cols, row, wide_end..je);
                    }
                }
            }
            // Rows left over (fewer than four).
            let done = groups * 4 * cols;
            lora_rows_plain(&mut acc[done..], &coef[groups * 4 * rank..], a, rank, cols);
        }
    };
}

lora_kernel!(
    /// AVX2: a 4 x 24 tile in twelve registers; 192 columns of A (24 KiB at r = 32) per block.
    lora_rows_avx2, "avx2", 8, 3, 192,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_add_ps, _mm256_mul_ps
);
lora_kernel!(
    /// AVX-512: a 4 x 64 tile in sixteen registers; 256 columns of A (32 KiB at r = 32) per block.
    lora_rows_avx512, "avx512f", 16, 4, 256,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_add_ps, _mm512_mul_ps
);

/// bf16 in, bf16 out, with AVX-512: the AVX-512 kernel's tiles, but W is widened from bf16 as a tile is loaded and
/// the sum is rounded to bf16 as it is stored (round to nearest even, NaN to 0x7FC0: [`dtype::f32_to_bf16_bits`]
/// in vector form), so no f32 copy of the band exists. Per element: widen, add the rank terms in order, round once:
/// the same bits as widening, [`lora_rows_plain`] and narrowing.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lora_rows_avx512_bf16(w: &[u8], coef: &[f32], a: &[f32], rank: usize, cols: usize, out: &mut [u8]) {
    use std::arch::x86_64::*;
    const BLOCK: usize = 256;
    let rows = w.len() / 2 / cols;
    let groups = rows / 4;
    assert!(coef.len() >= rows * rank && a.len() >= rank * cols && out.len() >= rows * cols * 2);
    let (wp, op, cp, ap) = (w.as_ptr(), out.as_mut_ptr(), coef.as_ptr(), a.as_ptr());
    // SAFETY (both helpers): `p` points at 16 bf16 values inside the band (checked by the callers' bounds).
    let load = |p: *const u8| unsafe {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    };
    let store = |p: *mut u8, v: __m512| unsafe {
        let bits = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb);
        let rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
        let nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        let r = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0));
        _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(r));
    };
    for jb in (0..cols).step_by(BLOCK) {
        let je = (jb + BLOCK).min(cols);
        let wide_end = jb + (je - jb) / 64 * 64;
        for g in 0..groups {
            let r = g * 4;
            let mut j = jb;
            while j < wide_end {
                // SAFETY: rows r..r+4 and columns j..j+64 lie inside the band (j + 64 <= je <= cols).
                unsafe {
                    let at = [r * cols + j, (r + 1) * cols + j, (r + 2) * cols + j, (r + 3) * cols + j];
                    let mut t = [[_mm512_setzero_ps(); 4]; 4];
                    for (ti, &e) in t.iter_mut().zip(&at) {
                        for (v, tv) in ti.iter_mut().enumerate() {
                            *tv = load(wp.add(2 * (e + 16 * v)));
                        }
                    }
                    for k in 0..rank {
                        let ak = ap.add(k * cols + j);
                        let av = [
                            _mm512_loadu_ps(ak),
                            _mm512_loadu_ps(ak.add(16)),
                            _mm512_loadu_ps(ak.add(32)),
                            _mm512_loadu_ps(ak.add(48)),
                        ];
                        for (i, ti) in t.iter_mut().enumerate() {
                            let c = _mm512_set1_ps(*cp.add((r + i) * rank + k));
                            for (tv, &x) in ti.iter_mut().zip(&av) {
                                *tv = _mm512_add_ps(*tv, _mm512_mul_ps(c, x));
                            }
                        }
                    }
                    for (ti, &e) in t.iter().zip(&at) {
                        for (v, tv) in ti.iter().enumerate() {
                            store(op.add(2 * (e + 16 * v)), *tv);
                        }
                    }
                }
                j += 64;
            }
            for row in r..r + 4 {
                bf16_tail(w, coef, a, rank, cols, out, row, wide_end..je);
            }
        }
    }
    for row in groups * 4..rows {
        bf16_tail(w, coef, a, rank, cols, out, row, 0..cols);
    }
}

/// One row's columns `range` of an f32 merge, an element at a time (the same operations as the vector paths).
#[cfg(target_arch = "x86_64")]
fn f32_tail(
    acc: &mut [f32],
    coef: &[f32],
    a: &[f32],
    rank: usize,
    cols: usize,
    row: usize,
    range: std::ops::Range<usize>,
) {
    let c = &coef[row * rank..(row + 1) * rank];
    for j in range {
        let mut v = acc[row * cols + j];
        for (k, &ck) in c.iter().enumerate() {
            v += ck * a[k * cols + j];
        }
        acc[row * cols + j] = v;
    }
}

/// One row's columns `range` of a bf16 merge, an element at a time (the same operations as the vector paths).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn bf16_tail(
    w: &[u8],
    coef: &[f32],
    a: &[f32],
    rank: usize,
    cols: usize,
    out: &mut [u8],
    row: usize,
    range: std::ops::Range<usize>,
) {
    let c = &coef[row * rank..(row + 1) * rank];
    for j in range {
        let e = row * cols + j;
        let mut v = f32::from_bits((u16::from_le_bytes([w[2 * e], w[2 * e + 1]]) as u32) << 16);
        for (k, &ck) in c.iter().enumerate() {
            v += ck * a[k * cols + j];
        }
        out[2 * e..2 * e + 2].copy_from_slice(&dtype::f32_to_bf16_bits(v).to_le_bytes());
    }
}

/// Columns of an output tile in the portable kernel: a tile of four rows stays in L1 while the rank loop runs over it.
const LORA_TILE: usize = 256;

/// The portable kernel (WASI, the browser, CPUs without AVX2), and the reference order of operations.
#[inline(always)]
fn lora_rows_plain(acc: &mut [f32], coef: &[f32], a: &[f32], rank: usize, cols: usize) {
    for (rows4, c4) in acc.chunks_mut(4 * cols).zip(coef.chunks(4 * rank)) {
        for j0 in (0..cols).step_by(LORA_TILE) {
            let j1 = (j0 + LORA_TILE).min(cols);
            for k in 0..rank {
                let a_tile = &a[k * cols + j0..k * cols + j1];
                for (row, c) in rows4.chunks_mut(cols).zip(c4.chunks(rank)) {
                    let ck = c[k];
                    for (o, &x) in row[j0..j1].iter_mut().zip(a_tile) {
                        *o += ck * x;
                    }
                }
            }
        }
    }
}

/// Where an output tensor's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A strided view of one storage.
    View(StridedView),
    /// Chunks that tile a global tensor.
    Chunked(ChunkedTensor),
    /// A LoRA-merged weight, produced as f32.
    Lora(Box<LoraMerge>),
}

impl Source {
    /// Element type of the source bytes.
    pub fn dtype(&self) -> DType {
        match self {
            Source::View(v) => v.dtype,
            Source::Chunked(c) => c.dtype,
            Source::Lora(l) => l.out,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        match self {
            Source::View(v) => v.numel(),
            Source::Chunked(c) => c.numel(),
            Source::Lora(l) => l.rows * l.cols,
        }
    }

    /// Elements per band unit: bands must be whole multiples of it.
    fn band_unit(&self) -> u64 {
        match self {
            Source::View(_) => 1,
            Source::Chunked(c) => c.row,
            Source::Lora(l) => l.cols.max(1),
        }
    }

    fn read(&self, inputs: &[Input], start: u64, count: u64, out: &mut [u8], bufs: &mut ChunkBuffers) -> Result<()> {
        match self {
            Source::View(v) => v.read(inputs, start, count, out, &mut bufs.window),
            Source::Chunked(c) => c.read(inputs, start, count, out, bufs),
            Source::Lora(l) => l.read(inputs, start, count, out, bufs),
        }
    }
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    /// Output name.
    pub name: String,
    /// Output dtype (after any cast).
    pub dtype: DType,
    /// Output shape.
    pub shape: Vec<u64>,
    /// Where the bytes come from.
    pub source: Source,
}

#[derive(Default)]
struct ChunkBuffers {
    window: Window,
    rows: Vec<u8>,
    /// W's raw rows for a LoRA band.
    lora_raw: Vec<u8>,
    /// A's or B's raw bytes (kept apart from `lora_raw` so neither buffer shrinks and regrows every band).
    lora_small: Vec<u8>,
    lora_b: Vec<f32>,
    /// LoRA `A` in f32, keyed by the merge it belongs to.
    lora_a: (usize, Vec<f32>),
}

/// Reusable buffers for band reads.
#[derive(Default)]
pub struct BandBuffers {
    chunk: ChunkBuffers,
    src: Vec<u8>,
}

impl PlannedTensor {
    /// A tensor copied from `source`, cast to `cast` when that is a float type and the source is one too.
    pub fn from_source(name: String, shape: Vec<u64>, source: Source, cast: Option<DType>) -> Self {
        let src = source.dtype();
        let dtype = match cast {
            Some(c) if src.is_castable_float() => c,
            _ => src,
        };
        PlannedTensor { name, dtype, shape, source }
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.source.numel()
    }

    /// Output size in bytes.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// Elements per band: at most [`BAND_BYTES`] of source or output, in whole band units (one row of a
    /// chunked tensor at least, so a single row wider than the band is read whole).
    pub fn band_elems(&self) -> u64 {
        let accumulator = if matches!(self.source, Source::Lora(_)) { 4 } else { 1 }; // LoRA bands are merged in f32
        let widest = self.dtype.size().max(self.source.dtype().size()).max(accumulator) as u64;
        let unit = self.source.band_unit();
        ((BAND_BYTES as u64 / widest) / unit).max(1) * unit
    }

    /// Indices of the inputs this tensor reads.
    pub fn inputs_used(&self) -> Vec<usize> {
        fn collect(s: &Source, out: &mut Vec<usize>) {
            match s {
                Source::View(v) => out.push(v.input),
                Source::Chunked(c) => out.extend(c.chunks.iter().map(|c| c.view.input)),
                Source::Lora(l) => {
                    collect(&l.base, out);
                    collect(&l.a, out);
                    collect(&l.b, out);
                }
            }
        }
        let mut v = Vec::new();
        collect(&self.source, &mut v);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Tells the inputs this tensor read that it is done, so they can drop caches and decoders.
    pub fn release(&self, inputs: &[Input]) {
        for i in self.inputs_used() {
            if let Some(input) = inputs.get(i) {
                input.data.release();
            }
        }
    }

    /// Input ranges `(input index, offset, length)` that hold output elements `[start, start + count)`
    /// verbatim, in order, when the bytes need no gathering or cast.
    pub fn verbatim_pieces(&self, start: u64, count: u64) -> Option<Vec<(usize, u64, u64)>> {
        if self.source.dtype() != self.dtype {
            return None;
        }
        match &self.source {
            Source::View(v) if v.is_contiguous() => {
                let esz = v.dtype.size() as u64;
                Some(vec![(v.input, v.data_start + (v.offset + start) * esz, count * esz)])
            }
            Source::View(_) | Source::Lora(_) => None,
            Source::Chunked(c) => c.verbatim_pieces(start, count),
        }
    }

    /// Computes the whole tensor with several workers that write their blocks straight to `offset` in `target`,
    /// when its source allows it (a LoRA merge whose W the workers can read); `false` means nothing was done.
    pub fn write_whole_at(
        &self,
        inputs: &[Input],
        target: &crate::io::Positional,
        offset: u64,
        bufs: &mut BandBuffers,
    ) -> Result<bool> {
        match &self.source {
            Source::Lora(l) if l.out == self.dtype => {
                l.run(inputs, 0, self.numel(), Dest::File { target, offset }, &mut bufs.chunk)
            }
            _ => Ok(false),
        }
    }

    /// Fills `out` with output elements `[start, start + count)` (whole band units), reading and casting.
    pub fn read_band(
        &self,
        inputs: &[Input],
        start: u64,
        count: u64,
        out: &mut [u8],
        bufs: &mut BandBuffers,
    ) -> Result<()> {
        let src_dtype = self.source.dtype();
        if src_dtype == self.dtype {
            return self.source.read(inputs, start, count, out, &mut bufs.chunk);
        }
        fit(&mut bufs.src, (count * src_dtype.size() as u64) as usize);
        self.source.read(inputs, start, count, &mut bufs.src, &mut bufs.chunk)?;
        dtype::cast(src_dtype, self.dtype, &bufs.src, out);
        Ok(())
    }
}

/// The full list of output tensors, in output order, plus notes for the user.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Output tensors.
    pub tensors: Vec<PlannedTensor>,
    /// What the planner decided and why (prefix chosen, groups skipped), for reports.
    pub notes: Vec<String>,
}

impl Plan {
    /// Total output tensor bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(PlannedTensor::nbytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(storage: &[u8], dtype: DType, offset: u64, shape: &[u64], strides: &[u64]) -> (Vec<Input>, StridedView) {
        let inputs = vec![Input::new("mem", Box::new(storage.to_vec()))];
        let v = StridedView::new("t", 0, 0, storage.len() as u64, dtype, offset, shape.to_vec(), strides.to_vec(), 64)
            .unwrap();
        (inputs, v)
    }

    #[test]
    fn transposed_view_reads_row_major() {
        // storage 2x3 u8 [[0,1,2],[3,4,5]]; its transpose is 3x2 with strides (1, 3).
        let (inputs, v) = view(&[0, 1, 2, 3, 4, 5], DType::U8, 0, &[3, 2], &[1, 3]);
        assert!(!v.is_contiguous());
        let mut out = vec![0u8; 6];
        v.read(&inputs, 0, 6, &mut out, &mut Window::default()).unwrap();
        assert_eq!(out, [0, 3, 1, 4, 2, 5]);
        // A band that starts mid-row.
        let mut out = vec![0u8; 3];
        v.read(&inputs, 3, 3, &mut out, &mut Window::default()).unwrap();
        assert_eq!(out, [4, 2, 5]);
    }

    #[test]
    fn sliced_view_with_offset() {
        let data: Vec<u8> = (0..20).collect();
        // x.view(4,5)[1:3, 1:4] -> offset 6, shape (2,3), strides (5,1)
        let (inputs, v) = view(&data, DType::U8, 6, &[2, 3], &[5, 1]);
        let mut out = vec![0u8; 6];
        v.read(&inputs, 0, 6, &mut out, &mut Window::default()).unwrap();
        assert_eq!(out, [6, 7, 8, 11, 12, 13]);
    }

    #[test]
    fn view_past_storage_is_refused() {
        let e = StridedView::new("w", 0, 0, 16, DType::F32, 1, vec![4], vec![1], 64).unwrap_err();
        assert!(e.to_string().contains("reaches byte 20"), "{e}");
        let e = StridedView::new("w", 0, 0, 16, DType::F32, 0, vec![u64::MAX, 2], vec![1, 1], 64).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
    }

    #[test]
    fn empty_and_scalar_views() {
        let v = StridedView::new("e", 0, 0, 0, DType::F32, 0, vec![3, 0], vec![0, 1], 64).unwrap();
        assert_eq!(v.numel(), 0);
        let (inputs, s) = view(&7f32.to_le_bytes(), DType::F32, 0, &[], &[]);
        assert!(s.is_contiguous());
        let mut out = vec![0u8; 4];
        s.read(&inputs, 0, 1, &mut out, &mut Window::default()).unwrap();
        assert_eq!(f32::from_le_bytes(out.try_into().unwrap()), 7.0);
    }

    /// The register-blocked AVX2 kernel and the threaded split give the same bits as the one-element-at-a-time loop,
    /// on shapes that leave partial row groups, partial 24-column tiles and partial column blocks.
    #[test]
    fn lora_kernels_agree_bit_for_bit() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Values of mixed magnitude, so that the order of additions matters to the last bit.
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * if seed & 1 == 0 { 1.0 } else { 1e-3 }
        };
        for (rows, cols, rank) in
            [(1, 5, 1), (7, 23, 3), (9, 200, 8), (130, 413, 32), (66, 24, 16), (4, 192 + 24 + 7, 5)]
        {
            let mut w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            // Values the rounding must get right too: NaN, infinity, and the largest finite f32 (rounds to infinity).
            for (i, x) in [f32::NAN, f32::INFINITY, f32::MAX, -0.0].into_iter().enumerate() {
                if let Some(v) = w.get_mut(i * 37 % (rows * cols)) {
                    *v = x;
                }
            }
            let coef: Vec<f32> = (0..rows * rank).map(|_| next()).collect();
            let a: Vec<f32> = (0..rank * cols).map(|_| next()).collect();
            let mut want = w.clone();
            for r in 0..rows {
                for j in 0..cols {
                    let mut v = want[r * cols + j];
                    for k in 0..rank {
                        v += coef[r * rank + k] * a[k * cols + j];
                    }
                    want[r * cols + j] = v;
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut plain = w.clone();
            lora_rows_plain(&mut plain, &coef, &a, rank, cols);
            let mut dispatched = w.clone();
            lora_rows(&mut dispatched, &coef, &a, rank, cols);
            #[cfg(target_arch = "x86_64")]
            for (feature, kernel) in [
                ("avx2", lora_rows_avx2 as unsafe fn(&mut [f32], &[f32], &[f32], usize, usize)),
                ("avx512f", lora_rows_avx512),
            ] {
                let on = match feature {
                    "avx2" => std::arch::is_x86_feature_detected!("avx2"),
                    _ => std::arch::is_x86_feature_detected!("avx512f"),
                };
                if on {
                    let mut v = w.clone();
                    // SAFETY: the CPU has the feature, checked just above.
                    unsafe { kernel(&mut v, &coef, &a, rank, cols) };
                    assert_eq!(bits(&v), bits(&want), "{feature} kernel, {rows}x{cols} r{rank}");
                }
            }
            // The whole band path (widen, two threads, narrow to f32) on f32 bytes of W.
            let wb: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            let band =
                Band { w: WRows::Mem(&wb), w_dtype: DType::F32, coef: &coef, a: &a, rank, cols, out_dtype: DType::F32 };
            let mut out = vec![0u8; rows * cols * 4];
            lora_band(&band, rows, Dest::Mem(&mut out)).unwrap();
            let banded: Vec<f32> = out.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(bits(&banded), bits(&want), "band path, {rows}x{cols} r{rank}");
            // bf16 in and out (the fused AVX-512 path where the CPU has it): W rounded to bf16 first, then merged and
            // rounded once; compared with widening, the reference loop and torch-exact narrowing.
            let wb16: Vec<u8> = w.iter().flat_map(|&x| dtype::f32_to_bf16_bits(x).to_le_bytes()).collect();
            let mut want16 = vec![0f32; rows * cols];
            dtype::widen_to_f32(DType::BF16, &wb16, &mut want16);
            lora_rows_plain(&mut want16, &coef, &a, rank, cols);
            let mut want16_bytes = vec![0u8; rows * cols * 2];
            dtype::narrow_from_f32(&want16, DType::BF16, &mut want16_bytes);
            let band = Band {
                w: WRows::Mem(&wb16),
                w_dtype: DType::BF16,
                coef: &coef,
                a: &a,
                rank,
                cols,
                out_dtype: DType::BF16,
            };
            let mut out16 = vec![0u8; rows * cols * 2];
            lora_band(&band, rows, Dest::Mem(&mut out16)).unwrap();
            assert_eq!(out16, want16_bytes, "bf16 band path, {rows}x{cols} r{rank}");
            assert_eq!(bits(&plain), bits(&want), "plain kernel, {rows}x{cols} r{rank}");
            assert_eq!(bits(&dispatched), bits(&want), "dispatched kernel, {rows}x{cols} r{rank}");
        }
    }
}
