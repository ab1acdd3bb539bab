//! The one read abstraction: random access over a byte source of known length.
//!
//! Parsers never see `std::fs`, browser blobs or mmap; they see [`ReadAt`]. Native and WASI builds back it
//! with a file, the browser with `FileReaderSync`, tests with `&[u8]`. [`ByteCursor`] adds a small read
//! buffer for the many tiny reads of pickles and zip headers; bulk tensor reads bypass it.

use crate::error::{Error, ErrorKind, Result};

/// Random-access reads of a byte source whose length is known up front.
pub trait ReadAt {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`; a short source is an error. A reader that decodes may carry its own [`Error`]
    /// inside the `io::Error` (`io::Error::other(error)`): [`read_exact_named`] hands it back as it is.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// The concrete reader, so that a sink built for it can take a faster path (e.g. an in-kernel file
    /// copy). The core itself never looks.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// Drops caches and decoder state; called when a tensor that read this source is done.
    fn release(&self) {}
    /// Checks what no read reached, once every output byte is written and before anything is committed: a decoding
    /// reader finishes the compressed entries that reads stopped short of (a deflated entry's size and CRC-32 are
    /// only known at its end). Errors travel as in [`ReadAt::read_at`].
    fn check_unread(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// A hint that these `(offset, len)` ranges are read soon, each by one read of exactly that range, in any
    /// order: a source that fetches with latency (a URL) asks for them all at once, not one round trip each.
    fn prefetch(&self, _ranges: &[(u64, u64)]) {}
    /// A second handle on the same bytes that another thread may read from, when this source can give one
    /// (a native file: another descriptor); work that splits across threads then reads in parallel.
    fn sendable(&self) -> Option<Box<dyn ReadAt + Send + Sync>> {
        None
    }
    /// The bytes this source stores of its own: its length, or 0 for a view decoded out of another source (a
    /// compressed item), whose stored bytes that source already counts; a file whose deflated entries it inflates
    /// stores its first `stored_len` bytes, and the rest are decoded. The expansion limit weighs a plan's tensors
    /// against these, and only bytes below it are ever copied verbatim.
    fn stored_len(&self) -> u64 {
        self.len()
    }
}

/// Positional writes into one output file, from any thread (native files: `pwrite`).
pub trait WriteAt {
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()>;
}

/// An output file open for positional writes, with the name its errors carry.
pub struct Positional {
    /// The (temporary) file name.
    pub name: String,
    /// The writer.
    pub file: Box<dyn WriteAt + Send + Sync>,
}

/// An input shared by several readers (a `.distcp` file and the compressed items inside it).
pub struct SharedInput(pub std::rc::Rc<Input>);

impl ReadAt for SharedInput {
    fn len(&self) -> u64 {
        self.0.data.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.data.read_at(offset, buf)
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        self.0.data.as_any()
    }
    fn stored_len(&self) -> u64 {
        self.0.data.stored_len()
    }
    fn check_unread(&self) -> std::io::Result<()> {
        self.0.data.check_unread()
    }
    fn prefetch(&self, ranges: &[(u64, u64)]) {
        self.0.data.prefetch(ranges)
    }
}

impl ReadAt for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.as_slice().read_at(offset, buf)
    }
}

fn eof() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past end")
}

/// Reads exactly `buf.len()` bytes at `offset` of `data`, with a clear error naming `name` on a short file.
pub fn read_exact_named(name: &str, data: &dyn ReadAt, offset: u64, buf: &mut [u8]) -> Result<()> {
    let end = offset
        .checked_add(buf.len() as u64)
        .ok_or_else(|| Error::new(ErrorKind::Truncated(format!("offset {offset} overflows"))).in_file(name))?;
    if end > data.len() {
        return Err(Error::new(ErrorKind::Truncated(format!(
            "needs bytes {offset}..{end} but the file has {}",
            data.len()
        )))
        .in_file(name));
    }
    data.read_at(offset, buf).map_err(|e| from_io(name, e, || format!("read at {offset}")))
}

/// The error of a read of `name`: a decoding reader's own [`Error`] (a corrupt deflated entry) as it is, with its
/// kind and message; any other as an I/O error saying what was being done.
fn from_io(name: &str, e: std::io::Error, doing: impl FnOnce() -> String) -> Error {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(own) => own.clone().in_file(name),
        None => Error::new(ErrorKind::Io(format!("{}: {e}", doing()))).in_file(name),
    }
}

/// A named input: the name is what errors and reports show.
pub struct Input {
    /// Display name (a path on disk, a relative path in a dropped folder).
    pub name: String,
    /// The bytes.
    pub data: Box<dyn ReadAt>,
    /// Globals beyond the allowlist that the user trusts this input's pickles to call (`--allow-global`).
    pub allowed_globals: AllowedGlobals,
    /// When set, every global the input's pickles name is added here (`scan` reports them all, allowed or not).
    pub global_log: Option<GlobalLog>,
}

/// The globals pickles named, in order of first use: `module.name` (Python 3 spelling) and the pickle byte offset.
pub type GlobalLog = std::sync::Arc<std::sync::Mutex<Vec<(String, u64)>>>;

/// `module.name` of globals the user allows (`--allow-global`), shared by every input of one conversion.
pub type AllowedGlobals = std::sync::Arc<[String]>;

impl Input {
    /// Wraps a reader under a display name.
    pub fn new(name: impl Into<String>, data: Box<dyn ReadAt>) -> Self {
        Input { name: name.into(), data, allowed_globals: AllowedGlobals::from([]), global_log: None }
    }

    /// Reads exactly `buf.len()` bytes at `offset`, with a clear error on a short file.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_exact_named(&self.name, &*self.data, offset, buf)
    }

    /// Reads `len` bytes at `offset` into a new buffer; `len` is checked against the file first.
    pub fn read_vec(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let end = offset.checked_add(len).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            Error::new(ErrorKind::Truncated(format!(
                "needs {len} bytes at {offset} but the file has {}",
                self.data.len()
            )))
            .in_file(&self.name)
        })?;
        let mut buf = vec![0u8; (end - offset) as usize];
        self.read_exact_at(offset, &mut buf)?;
        Ok(buf)
    }

    /// Checks what no read of the input reached ([`ReadAt::check_unread`]).
    pub fn check_unread(&self) -> Result<()> {
        self.data.check_unread().map_err(|e| from_io(&self.name, e, || "checking what was not read".into()))
    }

    /// Length of the input in bytes.
    pub fn len(&self) -> u64 {
        self.data.len()
    }

    /// Whether the input is empty.
    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }
}

/// A buffered forward reader over `[start, end)` of an input, for pickles and headers.
pub struct ByteCursor<'a> {
    input: &'a Input,
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

const CURSOR_BUF: usize = 64 * 1024;

impl<'a> ByteCursor<'a> {
    /// A cursor over `[start, end)`; `end` must not exceed the input length.
    pub fn new(input: &'a Input, start: u64, end: u64) -> Result<Self> {
        if start > end || end > input.len() {
            return Err(Error::new(ErrorKind::Truncated(format!(
                "range {start}..{end} is outside the file of {} bytes",
                input.len()
            )))
            .in_file(&input.name));
        }
        Ok(ByteCursor { input, pos: start, end, buf: Vec::new(), buf_start: start })
    }

    /// Current absolute position.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Bytes left before `end`.
    pub fn remaining(&self) -> u64 {
        self.end - self.pos
    }

    /// The input this cursor reads.
    pub fn input(&self) -> &Input {
        self.input
    }

    fn fill(&mut self) -> Result<()> {
        let want = (self.end - self.pos).min(CURSOR_BUF as u64) as usize;
        self.buf.resize(want, 0);
        self.input.read_exact_at(self.pos, &mut self.buf)?;
        self.buf_start = self.pos;
        Ok(())
    }

    fn truncated(&self, n: u64) -> Error {
        Error::new(ErrorKind::Truncated(format!(
            "needs {n} more bytes at offset {} but only {} remain",
            self.pos,
            self.remaining()
        )))
        .in_file(&self.input.name)
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8> {
        if self.pos >= self.end {
            return Err(self.truncated(1));
        }
        let idx = self.pos.wrapping_sub(self.buf_start);
        if self.pos < self.buf_start || idx >= self.buf.len() as u64 {
            self.fill()?;
        }
        let b = self.buf[(self.pos - self.buf_start) as usize];
        self.pos += 1;
        Ok(b)
    }

    /// Reads exactly `n` bytes; `n` is checked against what remains before anything is allocated.
    pub fn bytes(&mut self, n: u64) -> Result<Vec<u8>> {
        if n > self.remaining() {
            return Err(self.truncated(n));
        }
        let mut out = Vec::with_capacity(n as usize);
        while (out.len() as u64) < n {
            let idx = self.pos.wrapping_sub(self.buf_start);
            if self.pos < self.buf_start || idx >= self.buf.len() as u64 {
                self.fill()?;
            }
            let avail = &self.buf[(self.pos - self.buf_start) as usize..];
            let take = avail.len().min((n - out.len() as u64) as usize);
            out.extend_from_slice(&avail[..take]);
            self.pos += take as u64;
        }
        Ok(out)
    }

    /// Reads a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let v = self.bytes(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&v);
        Ok(a)
    }

    /// Reads bytes up to (not including) the next `\n`, consuming it; lines are capped at `max` bytes.
    pub fn line(&mut self, max: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let b = self.u8()?;
            if b == b'\n' {
                return Ok(out);
            }
            if out.len() >= max {
                return Err(Error::new(ErrorKind::Limit(format!(
                    "text line longer than {max} bytes at offset {}",
                    self.pos
                )))
                .in_file(&self.input.name));
            }
            out.push(b);
        }
    }
}

/// `dir/name`, or `name` when `dir` is empty.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
}

/// A virtual folder of named inputs: a directory on disk, files dropped in a browser, or a map in tests.
/// Paths are relative and `/`-separated.
pub trait Folder {
    /// Display name of the folder (used in messages).
    fn name(&self) -> &str;
    /// Every file below the folder.
    fn files(&self) -> Vec<String>;
    /// Opens one file by relative path.
    fn open(&self, rel: &str) -> Result<Input>;
}

/// A folder whose inputs carry the globals the user allows: every pickle read through it may call those too.
pub struct Trusting<'a> {
    /// The folder.
    pub folder: &'a dyn Folder,
    /// What it may call beyond the allowlist.
    pub allowed: AllowedGlobals,
}

impl Folder for Trusting<'_> {
    fn name(&self) -> &str {
        self.folder.name()
    }
    fn files(&self) -> Vec<String> {
        self.folder.files()
    }
    fn open(&self, rel: &str) -> Result<Input> {
        let mut input = self.folder.open(rel)?;
        input.allowed_globals = self.allowed.clone();
        Ok(input)
    }
}

/// A folder held in memory, for tests.
#[derive(Default)]
pub struct MemoryFolder {
    /// Display name.
    pub name: String,
    /// Files by relative path.
    pub files: std::collections::BTreeMap<String, Vec<u8>>,
}

impl Folder for MemoryFolder {
    fn name(&self) -> &str {
        &self.name
    }
    fn files(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }
    fn open(&self, rel: &str) -> Result<Input> {
        let data = self
            .files
            .get(rel)
            .ok_or_else(|| Error::new(ErrorKind::Io("no such file".into())).in_file(&format!("{}/{rel}", self.name)))?;
        Ok(Input::new(format!("{}/{rel}", self.name), Box::new(data.clone())))
    }
}
