//! The plan: every output tensor with its name, dtype, shape and the views its bytes come from.
//!
//! A plan is built from metadata alone. Writers pull each tensor in bands of bounded size through
//! [`PlannedTensor::read_band`], so peak memory does not depend on tensor or model size. The byte sources live
//! in submodules by job: [`view`] (strided views of one storage), [`chunked`] (chunks that tile a global
//! tensor), [`merge`] (the LoRA merge, threaded per band) and `kernels` (its SIMD kernels).

pub mod chunked;
pub mod dequant;
mod kernels;
pub mod merge;
pub mod view;

pub use chunked::{Chunk, ChunkedTensor, check_tiling};
pub use dequant::BlockDequant;
pub use merge::{BlockWriter, LoraMerge};
pub use view::{StridedView, Window};

use crate::dtype::{self, DType};
use crate::error::Result;
use crate::io::Input;

/// Sizes a reusable buffer to `n` bytes. Capacity grows to exactly what is asked, never doubled (a Vec's
/// amortized growth would turn an 8 MiB band into a 16 MiB allocation), and only new bytes are zeroed.
pub fn fit(v: &mut Vec<u8>, n: usize) {
    if v.capacity() < n {
        v.reserve_exact(n - v.len());
    }
    v.resize(n, 0);
}

/// Largest band a writer pulls at once, in bytes. Natively the sink's writer thread may hold a few bands while the
/// next is read (and a cast needs its source band too), so this sets peak memory; 8 MiB keeps a run under 64 MiB
/// and is far past the size where per-band costs (a read call, a hand-off) matter.
pub const BAND_BYTES: usize = 8 << 20;

/// Where an output tensor's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A strided view of one storage.
    View(StridedView),
    /// Chunks that tile a global tensor.
    Chunked(ChunkedTensor),
    /// A LoRA-merged weight, produced as f32.
    Lora(Box<LoraMerge>),
    /// An FP8 weight times its block scales.
    Dequant(Box<BlockDequant>),
}

impl Source {
    /// Element type of the source bytes.
    pub fn dtype(&self) -> DType {
        match self {
            Source::View(v) => v.dtype,
            Source::Chunked(c) => c.dtype,
            Source::Lora(l) => l.out,
            Source::Dequant(d) => d.out,
        }
    }

    /// Index `i` of dimension 0, without that dimension, then rows `[a, b)` of what remains: one expert's part
    /// of a fused `[experts, rows, ...]` tensor, still a view of the same bytes. `None` for a LoRA merge.
    pub fn slice(&self, name: &str, i: u64, (a, b): (u64, u64)) -> Option<Result<Source>> {
        Some(match self {
            Source::View(v) => v.layer(name, i).and_then(|l| l.rows(name, a, b)).map(Source::View),
            Source::Chunked(c) => c.slice(name, i, (a, b)).map(Source::Chunked),
            Source::Lora(_) | Source::Dequant(_) => return None,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        match self {
            Source::View(v) => v.numel(),
            Source::Chunked(c) => c.numel(),
            Source::Lora(l) => l.rows * l.cols,
            Source::Dequant(d) => d.rows * d.cols,
        }
    }

    /// Elements per band unit: bands must be whole multiples of it.
    fn band_unit(&self) -> u64 {
        match self {
            Source::View(_) => 1,
            Source::Chunked(c) => c.row,
            Source::Lora(l) => l.cols.max(1),
            Source::Dequant(d) => d.cols.max(1),
        }
    }

    fn read(&self, inputs: &[Input], start: u64, count: u64, out: &mut [u8], bufs: &mut ChunkBuffers) -> Result<()> {
        match self {
            Source::View(v) => v.read(inputs, start, count, out, &mut bufs.window),
            Source::Chunked(c) => c.read(inputs, start, count, out, bufs),
            Source::Lora(l) => l.read(inputs, start, count, out, bufs),
            Source::Dequant(d) => d.read(inputs, start, count, out, bufs),
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
pub(crate) struct ChunkBuffers {
    window: Window,
    rows: Vec<u8>,
    /// W's raw rows for a LoRA band.
    lora_raw: Vec<u8>,
    /// A's or B's raw bytes (kept apart from `lora_raw` so neither buffer shrinks and regrows every band).
    lora_small: Vec<u8>,
    lora_b: Vec<f32>,
    /// LoRA `A` in f32, keyed by the merge it belongs to.
    lora_a: (usize, Vec<f32>),
    /// An FP8 band's raw bytes, its scales' raw bytes, one block's 256 scaled values and the output bytes of
    /// every FP8 byte value for each block of a block row.
    deq_raw: Vec<u8>,
    deq_scale: Vec<u8>,
    deq_values: Vec<f32>,
    deq_tables: Vec<u8>,
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
        // LoRA and FP8 bands are computed in f32.
        let accumulator = if matches!(self.source, Source::Lora(_) | Source::Dequant(_)) { 4 } else { 1 };
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
                Source::Dequant(d) => {
                    collect(&d.weight, out);
                    collect(&d.scale, out);
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
            Source::View(_) | Source::Lora(_) | Source::Dequant(_) => None,
            Source::Chunked(c) => c.verbatim_pieces(start, count),
        }
    }

    /// Whether the bytes a verbatim copy of this tensor would take lie in bytes its inputs store (below
    /// [`crate::io::ReadAt::stored_len`]): bytes decoded out of a compressed entry exist only through their reader,
    /// never in the file a copy would read from.
    pub fn reads_stored_bytes(&self, inputs: &[Input]) -> bool {
        let stored = |v: &StridedView| {
            inputs.get(v.input).is_some_and(|i| v.data_start.saturating_add(v.storage_bytes) <= i.data.stored_len())
        };
        match &self.source {
            Source::View(v) => stored(v),
            Source::Chunked(c) => c.chunks.iter().all(|c| stored(&c.view)),
            Source::Lora(_) | Source::Dequant(_) => false,
        }
    }

    /// Computes the whole tensor with several workers, each handing its finished blocks to `write`, when its source
    /// allows it (a LoRA merge whose W the workers can read); `false` means nothing was done.
    pub fn write_whole(&self, inputs: &[Input], write: BlockWriter, bufs: &mut BandBuffers) -> Result<bool> {
        match &self.source {
            Source::Lora(l) if l.out == self.dtype => {
                l.run(inputs, 0, self.numel(), merge::Dest::Blocks(write), &mut bufs.chunk)
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
