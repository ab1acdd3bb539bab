//! Deflated zip entries (method 8) read as the bytes they inflate to, in bounded memory.
//!
//! torch.save stores its entries, but a checkpoint re-zipped by a user (Python's `zipfile` with `ZIP_DEFLATED`)
//! has deflated ones, and `torch.load` reads those. A deflate stream has no random access, so an entry is inflated
//! forward from its start and the reader keeps its place: reads at or after that place continue (skipping by
//! inflating), and a read behind it starts over from the entry's start. Bands read a tensor in order, so a
//! contiguous tensor costs one pass over its storage; a non-contiguous view (a transpose) costs up to one pass per
//! band, and views read out of order may cost one pass per read, which [`MAX_PASSES`] bounds. Memory per open
//! stream is the inflater's 32 KiB window plus a 64 KiB input buffer and a 32 KiB skip buffer, and an input keeps
//! at most [`OPEN_STREAMS`] streams open.
//!
//! Each entry must inflate to exactly the size its directory record declares (inflating stops at the first byte
//! past it: a lying size or a deflate bomb is an error, not more memory), and once inflated to its end its CRC-32
//! must match the record's. An entry that reads stopped short of (a view of part of a storage) is inflated to its
//! end once every output byte is written, before anything is committed ([`ReadAt::check_unread`]). How far an
//! entry may inflate at all is checked before, from its record ([`super::zip::ZipIndex::locate`]).
//!
//! A file with deflated entries is one input ([`Inflated`]): the file's own bytes, then each deflated entry's
//! inflated bytes at offsets past the end of the file, so a view of a deflated storage is an ordinary view of that
//! input, whichever reader (a single file, verl's or Megatron's rank files) found it. Its stored length stays the
//! file's, so the expansion limit and verbatim copies only ever see bytes the file holds. Small entries read while
//! opening the file (`data.pkl`, `byteorder`) go through an [`EntryReader`] of their own, whose offsets are the
//! entry's.
//!
//! `miniz_oxide` inflates: pure Rust, no C toolchain, builds for wasm32, and its streaming `inflate` fits a
//! forward reader over [`ReadAt`] (the `zip` crate wants `Read + Seek` and a whole archive of its own).

use super::zip::{ZipEntry, local_data_start};
use crate::error::{Error, ErrorKind, Result};
use crate::io::ReadAt;
use miniz_oxide::inflate::stream::{InflateState, inflate};
use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Compressed bytes read from the file at a time.
const INPUT_BUF: usize = 64 << 10;
/// Inflated bytes discarded at a time when a read skips forward.
const SKIP_BUF: usize = 32 << 10;
/// Streams an [`Inflated`] input keeps open: a LoRA merge reads W, A and B in turn, and each stream costs ~130 KiB.
const OPEN_STREAMS: usize = 4;
/// How many times over an entry may be inflated (each backward read starts it over), on top of
/// [`super::zip::INFLATE_ALLOWANCE`]: enough for a transposed view read band by band, not for views crafted to
/// read backwards at every element.
pub const MAX_PASSES: u64 = 64;

fn zerr(msg: String) -> Error {
    Error::new(ErrorKind::Zip(msg))
}

/// One inflation of an entry in progress.
struct Stream {
    state: Box<InflateState>,
    /// Entry offset of the next inflated byte.
    pos: u64,
    /// Compressed bytes read from the file so far.
    read: u64,
    input: Vec<u8>,
    at: usize,
    skip: Vec<u8>,
    crc: crc32fast::Hasher,
    /// The deflate stream has ended.
    ended: bool,
}

/// A deflated entry of a file: its directory record, where its compressed bytes start, and how much reading it has
/// inflated so far.
struct Deflated {
    entry: ZipEntry,
    /// Its compressed bytes' offset in the file, read from its local header on first use.
    start: Cell<Option<u64>>,
    /// Bytes inflated for it so far, over every pass.
    work: Cell<u64>,
    /// It was inflated to its end, with its declared size and CRC-32.
    checked: Cell<bool>,
}

impl Deflated {
    fn new(entry: ZipEntry) -> Self {
        Deflated { entry, start: Cell::new(None), work: Cell::new(0), checked: Cell::new(false) }
    }

    fn fresh(&self, raw: &dyn ReadAt) -> Result<Stream> {
        let e = &self.entry;
        if self.start.get().is_none() {
            let s = local_data_start(raw, e.local_header, &e.name)?;
            if s.checked_add(e.compressed).is_none_or(|end| end > raw.len()) {
                return Err(Error::new(ErrorKind::Truncated(format!(
                    "entry '{}' needs bytes {s}..{} but the file has {}",
                    e.name,
                    s.saturating_add(e.compressed),
                    raw.len()
                ))));
            }
            self.start.set(Some(s));
        }
        Ok(Stream {
            state: InflateState::new_boxed(DataFormat::Raw),
            pos: 0,
            read: 0,
            input: Vec::new(),
            at: 0,
            skip: Vec::new(),
            crc: crc32fast::Hasher::new(),
            ended: false,
        })
    }

    /// Fills `buf` with the entry's bytes at `offset`, from `slot`'s stream when it has not passed `offset` yet.
    fn read(&self, raw: &dyn ReadAt, slot: &mut Option<Stream>, offset: u64, buf: &mut [u8]) -> Result<()> {
        let e = &self.entry;
        let end = offset.checked_add(buf.len() as u64).filter(|&end| end <= e.size);
        if end.is_none() {
            return Err(Error::new(ErrorKind::Truncated(format!(
                "entry '{}' inflates to {} bytes; bytes {offset}..{} were asked for",
                e.name,
                e.size,
                offset.saturating_add(buf.len() as u64)
            ))));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let s = match slot {
            Some(s) if s.pos <= offset => s,
            _ => slot.insert(self.fresh(raw)?),
        };
        while s.pos < offset {
            let mut skip = std::mem::take(&mut s.skip);
            skip.resize((offset - s.pos).min(SKIP_BUF as u64) as usize, 0); // min first: usize is 32 bits on wasm32
            let r = self.inflate(raw, s, &mut skip);
            s.skip = skip;
            r?;
        }
        self.inflate(raw, s, buf)?;
        if s.pos == e.size { self.finish(raw, s) } else { Ok(()) }
    }

    /// Refills the stream's input buffer with the next compressed bytes (none once all are read).
    fn refill(&self, raw: &dyn ReadAt, s: &mut Stream) -> Result<()> {
        let start = self.start.get().unwrap_or(0);
        let n = (self.entry.compressed - s.read).min(INPUT_BUF as u64) as usize;
        s.input.resize(n, 0);
        s.at = 0;
        if n > 0 {
            let at = start + s.read;
            raw.read_at(at, &mut s.input).map_err(|err| Error::new(ErrorKind::Io(format!("read at {at}: {err}"))))?;
            s.read += n as u64;
        }
        Ok(())
    }

    /// Inflates exactly `out.len()` bytes (which stay within the declared size) into `out`.
    fn inflate(&self, raw: &dyn ReadAt, s: &mut Stream, out: &mut [u8]) -> Result<()> {
        let e = &self.entry;
        let mut filled = 0;
        while filled < out.len() {
            if s.ended {
                return Err(zerr(format!(
                    "entry '{}' inflates to only {} bytes, but its directory record declares {}",
                    e.name, s.pos, e.size
                )));
            }
            if s.at == s.input.len() {
                self.refill(raw, s)?;
            }
            let r = inflate(&mut s.state, &s.input[s.at..], &mut out[filled..], MZFlush::None);
            s.at += r.bytes_consumed;
            s.crc.update(&out[filled..filled + r.bytes_written]);
            filled += r.bytes_written;
            s.pos += r.bytes_written as u64;
            self.account(r.bytes_written as u64)?;
            if self.step_ended(r.status, r.bytes_consumed == 0 && r.bytes_written == 0, s)? {
                s.ended = true;
            }
        }
        Ok(())
    }

    /// After one inflate step: whether the stream has ended; going on is fine while the step made progress or more
    /// compressed bytes are to be read; otherwise the stream is cut short or corrupt.
    fn step_ended(&self, status: Result<MZStatus, MZError>, stalled: bool, s: &Stream) -> Result<bool> {
        let more_to_read = s.at == s.input.len() && s.read < self.entry.compressed;
        match status {
            Ok(MZStatus::StreamEnd) => Ok(true),
            Ok(_) | Err(MZError::Buf) if !stalled || more_to_read => Ok(false),
            Ok(_) | Err(MZError::Buf) if s.at == s.input.len() => Err(self.cut_short(s)),
            _ => Err(self.corrupt(s)),
        }
    }

    /// At the declared end: the stream must end there (a single byte more is an error) with the declared CRC-32.
    fn finish(&self, raw: &dyn ReadAt, s: &mut Stream) -> Result<()> {
        let e = &self.entry;
        let mut probe = [0u8; 1];
        while !s.ended {
            if s.at == s.input.len() {
                self.refill(raw, s)?;
            }
            let r = inflate(&mut s.state, &s.input[s.at..], &mut probe, MZFlush::None);
            s.at += r.bytes_consumed;
            if r.bytes_written > 0 {
                return Err(zerr(format!(
                    "entry '{}' inflates to more than the {} bytes its directory record declares (a lying size or a \
                     zip bomb)",
                    e.name, e.size
                )));
            }
            if self.step_ended(r.status, r.bytes_consumed == 0, s)? {
                s.ended = true;
            }
        }
        let crc = s.crc.clone().finalize();
        if crc != e.crc {
            return Err(zerr(format!(
                "entry '{}' fails its CRC-32 check: its {} inflated bytes have CRC-32 {crc:08x}, its directory record \
                 says {:08x}",
                e.name, e.size, e.crc
            )));
        }
        self.checked.set(true);
        Ok(())
    }

    fn account(&self, n: u64) -> Result<()> {
        let e = &self.entry;
        let work = self.work.get().saturating_add(n);
        self.work.set(work);
        if work > e.size.saturating_mul(MAX_PASSES).saturating_add(super::zip::INFLATE_ALLOWANCE) {
            return Err(Error::new(ErrorKind::Limit(format!(
                "deflated entry '{}' ({} bytes) was inflated more than {MAX_PASSES} times over: its views read it out \
                 of order, and a deflate stream can only be read forward (each backward read inflates it again from \
                 its start); convert a copy saved uncompressed, e.g. by torch.save(torch.load(...))",
                e.name, e.size
            ))));
        }
        Ok(())
    }

    fn cut_short(&self, s: &Stream) -> Error {
        let e = &self.entry;
        zerr(format!(
            "entry '{}': its deflate stream is cut short: its {} compressed bytes inflate to only {} of the {} bytes \
             its directory record declares",
            e.name, e.compressed, s.pos, e.size
        ))
    }

    fn corrupt(&self, s: &Stream) -> Error {
        zerr(format!("entry '{}': corrupt deflate data after {} inflated bytes", self.entry.name, s.pos))
    }
}

/// One deflated entry seen as the bytes it inflates to (offsets are the entry's), over the file's bytes `raw`.
pub struct EntryReader {
    file: String,
    raw: Rc<dyn ReadAt>,
    entry: Deflated,
    stream: RefCell<Option<Stream>>,
}

impl EntryReader {
    /// A reader of deflated `entry` of file `file` (whose bytes `raw` are).
    pub fn new(file: &str, raw: Rc<dyn ReadAt>, entry: ZipEntry) -> Self {
        EntryReader { file: file.to_string(), raw, entry: Deflated::new(entry), stream: RefCell::new(None) }
    }

    /// Reads `buf.len()` bytes at entry offset `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut slot = self.stream.borrow_mut();
        self.entry.read(&*self.raw, &mut slot, offset, buf).map_err(|e| e.in_file(&self.file))
    }

    /// Inflates the rest of the entry, so that its size and CRC-32 are checked even where no read reached its end.
    pub fn verify(&self) -> Result<()> {
        let size = self.entry.entry.size;
        match self.entry.checked.get() {
            true => Ok(()),
            _ if size == 0 => {
                let mut slot = self.stream.borrow_mut();
                let s = slot.insert(self.entry.fresh(&*self.raw).map_err(|e| e.in_file(&self.file))?);
                self.entry.finish(&*self.raw, s).map_err(|e| e.in_file(&self.file))
            }
            // Reading the last byte inflates everything before it, then checks the end.
            _ => self.read(size - 1, &mut [0u8]),
        }
    }
}

impl ReadAt for EntryReader {
    fn len(&self) -> u64 {
        self.entry.entry.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read(offset, buf).map_err(std::io::Error::other)
    }
    /// Inflated out of its file, which counts the compressed bytes.
    fn stored_len(&self) -> u64 {
        0
    }
}

/// An [`EntryReader`] shared with its opener, who checks the rest of the entry once the reads are done.
pub struct SharedEntry(pub Rc<EntryReader>);

impl ReadAt for SharedEntry {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn stored_len(&self) -> u64 {
        0
    }
}

/// A file with deflated entries: its own bytes at `[0, file length)`, then each deflated entry's inflated bytes at
/// the place [`super::zip::ZipIndex::place_deflated`] gave it.
pub struct Inflated {
    file: String,
    raw: Rc<dyn ReadAt>,
    raw_len: u64,
    /// Deflated entries in order of place.
    entries: Vec<Deflated>,
    total: u64,
    /// Open streams by entry index, least recently used first.
    streams: RefCell<Vec<(usize, Stream)>>,
}

impl Inflated {
    /// The file `file` of bytes `raw`, with the deflated `entries` placed from `raw.len()` to `total`.
    pub fn new(file: &str, raw: Rc<dyn ReadAt>, entries: Vec<ZipEntry>, total: u64) -> Self {
        let raw_len = raw.len();
        let entries = entries.into_iter().map(Deflated::new).collect();
        Inflated { file: file.to_string(), raw, raw_len, entries, total, streams: RefCell::new(Vec::new()) }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.total);
        let Some(end) = end else {
            return Err(Error::new(ErrorKind::Truncated(format!("bytes {offset}.. lie past the inflated entries"))));
        };
        if end <= self.raw_len {
            return self
                .raw
                .read_at(offset, buf)
                .map_err(|err| Error::new(ErrorKind::Io(format!("read at {offset}: {err}"))));
        }
        let place = |d: &Deflated| d.entry.inflated_at.unwrap_or(0);
        let k = self.entries.partition_point(|d| place(d) <= offset).wrapping_sub(1);
        let inside = self.entries.get(k).filter(|d| offset >= self.raw_len && end <= place(d) + d.entry.size);
        let Some(d) = inside else {
            // Views lie inside one storage, and windows stop at its end: no read spans two entries.
            return Err(Error::new(ErrorKind::Zip(format!(
                "bytes {offset}..{end} span the file and its inflated entries"
            ))));
        };
        let mut streams = self.streams.borrow_mut();
        let mut slot = streams.iter().position(|(i, _)| *i == k).map(|at| streams.remove(at).1);
        let r = d.read(&*self.raw, &mut slot, offset - place(d), buf);
        if let Some(s) = slot {
            if streams.len() >= OPEN_STREAMS {
                streams.remove(0);
            }
            streams.push((k, s));
        }
        r
    }
}

impl ReadAt for Inflated {
    fn len(&self) -> u64 {
        self.total
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read(offset, buf).map_err(|e| std::io::Error::other(e.in_file(&self.file)))
    }
    /// Only the file's own bytes: inflated ones are never copied verbatim, and the expansion limit weighs the file.
    fn stored_len(&self) -> u64 {
        self.raw_len
    }
    /// Every entry that was read but not to its end is inflated to it now, so that its size and CRC-32 are checked
    /// (a view of part of a storage, or a storage shorter than its entry declares).
    fn check_unread(&self) -> std::io::Result<()> {
        for d in self.entries.iter().filter(|d| d.work.get() > 0 && !d.checked.get()) {
            let last = d.entry.inflated_at.unwrap_or(0) + d.entry.size - 1;
            self.read(last, &mut [0u8]).map_err(|e| std::io::Error::other(e.in_file(&self.file)))?;
        }
        Ok(())
    }
    // No `as_any` (an in-kernel copy would read the file at offsets that are inflated bytes here), no `sendable`,
    // and no `release`: the open streams are few and small, and keeping them lets the next tensor over the same
    // storage continue where this one stopped instead of inflating it again.
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directory record of one deflated entry: `comp` compressed bytes, `declared` inflated, CRC `crc`.
    fn deflated_entry(comp: &[u8], declared: u64, crc: u32, inflated_at: Option<u64>) -> ZipEntry {
        ZipEntry {
            name: "archive/data/0".into(),
            data_start: 0,
            size: declared,
            method: super::super::zip::DEFLATED,
            compressed: comp.len() as u64,
            crc,
            inflated_at,
            local_header: 0,
        }
    }

    /// A deflated entry of `declared` bytes and CRC `crc` whose compressed bytes `comp` sit at offset 7 of a file.
    fn reader(comp: &[u8], declared: u64, crc: u32) -> EntryReader {
        let mut file = vec![0u8; 7];
        file.extend_from_slice(comp);
        let r = EntryReader::new("t.pt", Rc::new(file), deflated_entry(comp, declared, crc, None));
        r.entry.start.set(Some(7));
        r
    }

    fn content() -> Vec<u8> {
        // Compressible but not trivially: a slow ramp with a pseudo-random low byte.
        (0..300_000u32).map(|i| ((i / 1000) as u8) ^ ((i.wrapping_mul(2_654_435_761) >> 29) as u8)).collect()
    }

    fn crc(b: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(b);
        h.finalize()
    }

    fn err(r: &EntryReader, offset: u64, n: usize) -> String {
        match r.read(offset, &mut vec![0u8; n]) {
            Ok(()) => panic!("read {offset}+{n} succeeded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reads_forward_restarts_backward_and_stops_at_the_end() {
        let data = content();
        let comp = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let r = reader(&comp, data.len() as u64, crc(&data));
        let get = |offset: u64, n: usize| {
            let mut b = vec![0u8; n];
            r.read(offset, &mut b).map(|_| b)
        };
        let pos = || r.stream.borrow().as_ref().map(|s| s.pos);
        // In order: each read continues where the last stopped, and skips forward by inflating.
        assert_eq!(get(0, 1000).unwrap(), data[..1000]);
        assert_eq!(get(1000, 5000).unwrap(), data[1000..6000]);
        assert_eq!(get(100_000, 10).unwrap(), data[100_000..100_010]);
        assert_eq!(pos(), Some(100_010));
        assert_eq!(r.entry.work.get(), 100_010, "no byte inflated twice while reading forward");
        // Backwards: starts over from the entry's start (the cost: the 50,000 bytes before are inflated again).
        assert_eq!(get(50_000, 100).unwrap(), data[50_000..50_100]);
        assert_eq!(pos(), Some(50_100));
        assert_eq!(r.entry.work.get(), 100_010 + 50_100);
        // Up to the end: the stream ends there and its CRC is checked.
        let n = data.len() as u64;
        assert_eq!(get(n - 20, 20).unwrap(), data[data.len() - 20..]);
        assert!(r.verify().is_ok());
        // Across the end, or wholly past it: refused, naming the file and the entry.
        let e = err(&r, n - 10, 20);
        assert!(e.starts_with("t.pt: ") && e.contains("archive/data/0") && e.contains("inflates to 300000"), "{e}");
        let e = err(&r, n, 1);
        assert!(e.contains("archive/data/0"), "{e}");
        // The same bytes through the input that places the entry past the end of its file.
        let mut file = vec![9u8; 7];
        file.extend_from_slice(&comp);
        let mut entry = r.entry.entry.clone();
        entry.inflated_at = Some(file.len() as u64);
        let total = file.len() as u64 + n;
        let input = Inflated::new("t.pt", Rc::new(file), vec![entry], total);
        input.entries[0].start.set(Some(7));
        let mut b = vec![0u8; 64];
        input.read_at(total - 64, &mut b).unwrap();
        assert_eq!(b, data[data.len() - 64..]);
        input.read_at(0, &mut b[..7]).unwrap();
        assert_eq!(b[..7], [9; 7], "the file's own bytes come first");
        let file_len = 7 + comp.len() as u64;
        assert!(input.read_at(file_len - 3, &mut b).is_err(), "a read across the file's end and the first entry");
        assert_eq!(input.stored_len(), file_len);
    }

    /// An input of one file's bytes and one deflated entry declaring `declared` bytes, placed after the file.
    fn placed(comp: &[u8], declared: u64, crc: u32) -> Inflated {
        let file: Vec<u8> = comp.to_vec();
        let entry = deflated_entry(comp, declared, crc, Some(comp.len() as u64));
        let input = Inflated::new("t.pt", Rc::new(file), vec![entry], comp.len() as u64 + declared);
        input.entries[0].start.set(Some(0));
        input
    }

    #[test]
    fn what_reads_did_not_reach_is_checked_at_the_end() {
        let data = content();
        let comp = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let n = data.len() as u64;
        let at = comp.len() as u64;
        // Read in part, then checked to the end: a sound entry passes, an unread one is not inflated at all.
        let good = placed(&comp, n, crc(&data));
        assert!(good.check_unread().is_ok());
        assert_eq!(good.entries[0].work.get(), 0);
        let mut b = vec![0u8; 1000];
        good.read_at(at + 10, &mut b).unwrap();
        assert_eq!(b, data[10..1010]);
        assert!(!good.entries[0].checked.get());
        assert!(good.check_unread().is_ok());
        assert!(good.entries[0].checked.get());
        // A storage shorter than its entry declares: every read of it succeeds, the end does not.
        let short = placed(&comp, n + 4096, crc(&data));
        short.read_at(at, &mut vec![0u8; data.len()]).unwrap();
        let e = short.check_unread().unwrap_err().to_string();
        assert!(e.contains("t.pt: ") && e.contains("inflates to only 300000 bytes"), "{e}");
        // A wrong CRC behind the part that was read.
        let bad = placed(&comp, n, crc(&data) ^ 1);
        bad.read_at(at, &mut b).unwrap();
        let e = bad.check_unread().unwrap_err().to_string();
        assert!(e.contains("fails its CRC-32 check"), "{e}");
    }

    #[test]
    fn a_wrong_size_crc_or_stream_is_an_error_naming_the_entry() {
        let data = content();
        let comp = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let n = data.len() as u64;
        // Declared one byte short: inflating stops at the first byte past it.
        let short = reader(&comp, n - 1, crc(&data[..data.len() - 1]));
        let e = err(&short, n - 2, 1);
        assert!(e.contains("inflates to more than the 299999 bytes") && e.contains("archive/data/0"), "{e}");
        // Declared longer than the stream.
        let long = reader(&comp, n + 5, crc(&data));
        let e = err(&long, 0, data.len() + 5);
        assert!(e.contains("inflates to only 300000 bytes"), "{e}");
        // A wrong CRC, found once the entry is inflated to its end; reads before the end are fine.
        let bad = reader(&comp, n, crc(&data) ^ 1);
        assert!(bad.read(0, &mut [0u8; 100]).is_ok());
        let e = bad.verify().unwrap_err().to_string();
        assert!(e.contains("fails its CRC-32 check") && e.starts_with("t.pt: "), "{e}");
        // A stream cut short: an error where the bytes run out.
        let cut = reader(&comp[..comp.len() / 2], n, crc(&data));
        let e = err(&cut, 0, data.len());
        assert!(e.contains("cut short"), "{e}");
        // Bytes that are not deflate data.
        let junk = reader(&[0xff; 64], n, 0);
        let e = err(&junk, 0, 10);
        assert!(e.contains("corrupt deflate data"), "{e}");
    }

    #[test]
    fn reading_backwards_at_every_step_hits_the_pass_limit() {
        let data = vec![7u8; 1 << 20];
        let comp = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let r = reader(&comp, data.len() as u64, crc(&data));
        let limit = (MAX_PASSES * (1 << 20) + super::super::zip::INFLATE_ALLOWANCE) >> 20;
        let mut failed = None;
        // Each read lies behind the one before, so each starts over and inflates the whole entry.
        for i in 0..limit + 2 {
            if let Err(e) = r.read((1 << 20) - 1 - i, &mut [0u8]) {
                failed = Some((i, e.to_string()));
                break;
            }
        }
        let (i, e) = failed.expect("never refused");
        assert!(i > MAX_PASSES, "refused after only {i} passes");
        assert!(e.contains("inflated more than 64 times over"), "{e}");
    }
}
