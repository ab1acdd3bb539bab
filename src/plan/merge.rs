//! The LoRA merge `W + scale * B @ A`, computed per band of rows in f32 and rounded once; two workers share a band
//! natively. Results go to the band buffer, or block by block to a writer the caller gives (the sink's positional
//! file), never to a file of the plan's own choosing.

use super::kernels::lora_rows;
#[cfg(target_arch = "x86_64")]
use super::kernels::{lora_rows_avx512_bf16, narrow_avx2, widen_avx2};
use super::{ChunkBuffers, Source, fit};
use crate::dtype::{self, DType};
use crate::error::{Error, ErrorKind, Result};
use crate::io::Input;

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
    pub(super) fn read(
        &self,
        inputs: &[Input],
        start: u64,
        count: u64,
        out: &mut [u8],
        bufs: &mut ChunkBuffers,
    ) -> Result<()> {
        self.run(inputs, start, count, Dest::Mem(out), bufs).map(|_| ())
    }

    /// Elements `[start, start + count)` (whole rows) into `dest`. A positional destination needs W readable by
    /// the workers themselves (else nothing is done and the answer is `false`: the caller goes band by band).
    pub(super) fn run(
        &self,
        inputs: &[Input],
        start: u64,
        count: u64,
        dest: Dest,
        bufs: &mut ChunkBuffers,
    ) -> Result<bool> {
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
        if shared.is_none() && matches!(dest, Dest::Blocks(_)) {
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
                Dest::Blocks(_) => true,
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

/// Takes a finished block of a tensor's output bytes, at `offset` from the tensor's first byte, from any worker
/// thread (the writer passes the sink's positional file behind it).
pub type BlockWriter<'a> = &'a (dyn Fn(u64, &[u8]) -> Result<()> + Sync);

/// Where a band's result goes: a buffer, or block by block to a [`BlockWriter`] (each worker hands over its own).
pub(super) enum Dest<'a> {
    Mem(&'a mut [u8]),
    Blocks(BlockWriter<'a>),
}

/// Where a band's W rows are: already in memory, or in a file each worker reads its own blocks from.
pub(super) enum WRows<'a> {
    Mem(&'a [u8]),
    File { name: &'a str, reader: &'a (dyn crate::io::ReadAt + Send + Sync), offset: u64 },
}

/// One band of a LoRA merge: `out = narrow(widen(w) + coef @ a)`, row-major.
pub(super) struct Band<'a> {
    pub(super) w: WRows<'a>,
    pub(super) w_dtype: DType,
    pub(super) coef: &'a [f32],
    pub(super) a: &'a [f32],
    pub(super) rank: usize,
    pub(super) cols: usize,
    pub(super) out_dtype: DType,
}

/// Runs a band in blocks of rows small enough (about 256 KiB of f32) that reading, widening, merging and
/// narrowing a block all happen in one core's cache. Natively two workers take blocks from a shared queue, so
/// they stay balanced while the writer thread takes its share of the CPU; every element is computed the same
/// way whoever computes it.
pub(super) fn lora_band(band: &Band, rows: usize, dest: Dest) -> Result<()> {
    let cols = band.cols;
    if cols == 0 {
        return Ok(());
    }
    let osz = band.out_dtype.size();
    let block = ((256 << 10) / (cols * 4)).max(1).next_multiple_of(4);
    type Blocks<'b> = Box<dyn Iterator<Item = (usize, Option<&'b mut [u8]>)> + Send + 'b>;
    let (blocks, target): (Blocks, _) = match dest {
        Dest::Mem(out) => (Box::new(out.chunks_mut(block * cols * osz).map(Some).enumerate()), None),
        Dest::Blocks(write) => (Box::new((0..rows.div_ceil(block)).map(|i| (i, None))), Some(write)),
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
                (None, Some(write)) => {
                    fit(&mut obuf, block.min(rows - first) * cols * osz);
                    lora_block(band, first, &mut obuf, &mut wbuf, &mut acc)?;
                    write((first * cols * osz) as u64, &obuf)?;
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
