//! Random access to a zstd-compressed DCP item (`transform_descriptors: ["stream.zstd/1"]`).
//!
//! The item decompresses to a torch.save zip whose directory sits at its end, so a first pass decodes
//! the whole stream once to learn its length and keep its tail. Later reads decode forward from where the
//! last read stopped (bands read each chunk in order), restarting only for a backward read. Memory per item
//! is the decoder's window (capped) plus small buffers, and [`ReadAt::release`] drops it.

use crate::error::{Error, ErrorKind, Result};
use crate::io::{Input, ReadAt};
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
    /// Decodes the item at `[start, start + len)` of `src` once, checking it as it goes.
    pub fn open(src: Rc<Input>, start: u64, len: u64) -> Result<ZstdItem> {
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
