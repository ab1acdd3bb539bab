//! Random access to a zstd-compressed DCP item (`transform_descriptors: ["stream.zstd/1"]`).
//!
//! The item decompresses to a torch.save zip whose directory sits at its end, so a first pass decodes
//! the whole stream once to learn its length and keep its tail. Later reads decode forward from where the
//! last read stopped (bands read each chunk in order), restarting only for a backward read. Memory per item
//! is the decoder's window (capped) plus small buffers, and [`ReadAt::release`] drops it.

use crate::error::{Error, ErrorKind, Result};
use crate::io::{Input, ReadAt};
use crate::planned::{EXPANSION_ALLOWANCE, MAX_EXPANSION, expansion_limit};
use ruzstd::decoding::{FrameDecoder, StreamingDecoder};
use std::cell::RefCell;
use std::io::Read;
use std::rc::Rc;

/// Largest zstd window accepted (a hostile frame could ask for gigabytes).
const MAX_WINDOW: u64 = 64 << 20;
/// Decompressed bytes kept from the end of the stream (the zip directory lives there).
const TAIL: usize = 256 << 10;
/// Largest decompressed/compressed ratio accepted (real tensors compress a few times at most).
const MAX_RATIO: u64 = 1024;

/// A forward reader over a byte range of an input, with its own buffer.
struct RangeReader {
    src: Rc<Input>,
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    at: usize,
}

impl Read for RangeReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at >= self.buf.len() {
            let n = (self.end - self.pos).min(1 << 20) as usize;
            if n == 0 {
                return Ok(0);
            }
            self.buf.resize(n, 0);
            self.src.data.read_at(self.pos, &mut self.buf)?;
            self.pos += n as u64;
            self.at = 0;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

struct Cursor {
    decoder: StreamingDecoder<RangeReader, FrameDecoder>,
    pos: u64,
}

/// What the zstd items of one checkpoint may decode to together: at most [`MAX_EXPANSION`] times their compressed
/// bytes plus an allowance (as much as a plan may hold), so a folder of many items that each stay under the
/// per-item ratio cannot make planning decode without end.
pub struct DecodeBudget {
    allowance: u64,
    compressed: u64,
    decoded: u64,
}

impl DecodeBudget {
    /// A budget with `allowance` bytes on top of [`MAX_EXPANSION`] times the compressed bytes.
    pub fn new(allowance: u64) -> Self {
        DecodeBudget { allowance, compressed: 0, decoded: 0 }
    }

    /// Opens the item at `[start, start + len)` of `src` ([`ZstdItem::open`]) within what is left of the budget.
    pub fn open(&mut self, src: Rc<Input>, start: u64, len: u64) -> Result<ZstdItem> {
        let compressed = self.compressed.saturating_add(len);
        let left = expansion_limit(compressed, self.allowance).saturating_sub(self.decoded);
        let item = ZstdItem::open(src, start, len, left)?;
        self.compressed = compressed;
        self.decoded = self.decoded.saturating_add(item.total);
        Ok(item)
    }
}

/// A zstd-compressed item seen as the decompressed bytes it holds.
pub struct ZstdItem {
    src: Rc<Input>,
    start: u64,
    compressed: u64,
    total: u64,
    tail: Vec<u8>,
    cursor: RefCell<Option<Cursor>>,
}

fn zerr(src: &Input, start: u64, msg: String) -> Error {
    Error::new(ErrorKind::NotCheckpoint(format!("zstd item at byte {start}: {msg}"))).in_file(&src.name)
}

impl ZstdItem {
    /// Decodes the item at `[start, start + len)` of `src` once, checking it as it goes: it may inflate at most
    /// [`MAX_RATIO`] times and to at most `budget` bytes (what is left of its checkpoint's [`DecodeBudget`]).
    fn open(src: Rc<Input>, start: u64, len: u64, budget: u64) -> Result<ZstdItem> {
        if start.checked_add(len).is_none_or(|e| e > src.len()) {
            return Err(Error::new(ErrorKind::Truncated(format!(
                "zstd item {start}+{len} runs past the end of the {}-byte file",
                src.len()
            )))
            .in_file(&src.name));
        }
        let mut item = ZstdItem { src, start, compressed: len, total: 0, tail: Vec::new(), cursor: RefCell::new(None) };
        let mut c = item.fresh()?;
        let cap = len.saturating_mul(MAX_RATIO).max(1 << 20);
        let mut chunk = vec![0u8; 1 << 20];
        let mut tail: Vec<u8> = Vec::with_capacity(2 * TAIL);
        loop {
            let n = c.decoder.read(&mut chunk).map_err(|e| zerr(&item.src, start, e.to_string()))?;
            if n == 0 {
                break;
            }
            c.pos += n as u64;
            if c.pos > cap {
                return Err(Error::new(ErrorKind::Limit(format!(
                    "zstd item at byte {start} expands more than {MAX_RATIO}x (a decompression bomb?)"
                )))
                .in_file(&item.src.name));
            }
            if c.pos > budget {
                return Err(Error::new(ErrorKind::Limit(format!(
                    "zstd item at byte {start}: the checkpoint's zstd items decode to more than {MAX_EXPANSION} \
                     times their compressed bytes plus {} GiB (a decompression bomb?)",
                    EXPANSION_ALLOWANCE >> 30
                )))
                .in_file(&item.src.name));
            }
            tail.extend_from_slice(&chunk[..n]);
            if tail.len() > 2 * TAIL {
                tail.drain(..tail.len() - TAIL);
            }
        }
        if tail.len() > TAIL {
            tail.drain(..tail.len() - TAIL);
        }
        item.total = c.pos;
        item.tail = tail;
        Ok(item)
    }

    fn fresh(&self) -> Result<Cursor> {
        let reader = RangeReader {
            src: self.src.clone(),
            pos: self.start,
            end: self.start + self.compressed,
            buf: Vec::new(),
            at: 0,
        };
        let decoder = StreamingDecoder::new_with_max_window_size(reader, MAX_WINDOW)
            .map_err(|e| zerr(&self.src, self.start, e.to_string()))?;
        Ok(Cursor { decoder, pos: 0 })
    }

    fn read_forward(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut slot = self.cursor.borrow_mut();
        if slot.as_ref().is_none_or(|c| c.pos > offset) {
            *slot = Some(self.fresh()?);
        }
        let Some(c) = slot.as_mut() else { return Ok(()) };
        let mut skip = vec![0u8; (offset - c.pos).min(1 << 16) as usize];
        while c.pos < offset {
            let n = ((offset - c.pos) as usize).min(skip.len());
            c.decoder.read_exact(&mut skip[..n]).map_err(|e| zerr(&self.src, self.start, e.to_string()))?;
            c.pos += n as u64;
        }
        c.decoder.read_exact(buf).map_err(|e| zerr(&self.src, self.start, e.to_string()))?;
        c.pos += buf.len() as u64;
        Ok(())
    }
}

impl ReadAt for ZstdItem {
    fn len(&self) -> u64 {
        self.total
    }

    /// Decoded out of its `.distcp` file, which counts the compressed bytes.
    fn stored_len(&self) -> u64 {
        0
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.total);
        let Some(end) = end else {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the decompressed end"));
        };
        let tail_start = self.total - self.tail.len() as u64;
        if offset >= tail_start {
            let a = (offset - tail_start) as usize;
            buf.copy_from_slice(&self.tail[a..a + buf.len()]);
            return Ok(());
        }
        let _ = end;
        self.read_forward(offset, buf).map_err(std::io::Error::from)
    }

    fn release(&self) {
        *self.cursor.borrow_mut() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Folder, MemoryFolder};

    /// An item's (offset, length) in its file.
    type Span = (u64, u64);

    /// The hostile corpus's real zstd save of 1.25 GiB of zeros (tests/hostile/dcp/zstd_bomb): its
    /// __0_0.distcp, its big item and its small one.
    fn bomb() -> Option<(Rc<Input>, Span, Span)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile/dcp/zstd_bomb");
        let mut folder = MemoryFolder { name: "zstd_bomb".into(), ..Default::default() };
        for name in [".metadata", "__0_0.distcp"] {
            folder.files.insert(name.into(), std::fs::read(dir.join(name)).ok()?);
        }
        let meta = crate::dcp::read_metadata(&folder, "").ok()?;
        let item = |fqn: &str| {
            let c = &meta.tensors.iter().find(|t| t.fqn == fqn)?.chunks[0];
            Some((c.offset, c.length))
        };
        Some((Rc::new(folder.open("__0_0.distcp").ok()?), item("model.embed.weight")?, item("model.norm.weight")?))
    }

    #[test]
    fn items_decode_within_their_ratio_and_their_checkpoints_budget() {
        let Some((file, (big_at, big_len), (small_at, small_len))) = bomb() else {
            panic!("tests/hostile/dcp/zstd_bomb is missing or unreadable");
        };
        // Without an allowance the budget is 64x the compressed bytes of the items opened so far: the small item
        // fits, the same item again fits (it adds its own share), and the bomb passes the budget before 1024x.
        let mut budget = DecodeBudget::new(0);
        for _ in 0..2 {
            let small = budget.open(file.clone(), small_at, small_len).map(|i| i.len());
            assert!(matches!(small, Ok(n) if n > small_len && n < 64 * small_len), "{small:?}");
        }
        let over = budget.open(file.clone(), big_at, big_len).err().map(|e| e.to_string());
        assert!(over.as_deref().is_some_and(|e| e.contains("zstd items decode to more than 64 times")), "{over:?}");
        // With the real 1 GiB allowance the bomb is stopped by the per-item ratio instead.
        let ratio = DecodeBudget::new(EXPANSION_ALLOWANCE).open(file, big_at, big_len).err().map(|e| e.to_string());
        assert!(ratio.as_deref().is_some_and(|e| e.contains("expands more than 1024x")), "{ratio:?}");
    }
}
