//! Output: sinks that receive files as ordered byte streams, and the writers that fill them.
//!
//! A writer announces each file with its exact size (known from the plan), streams its bytes in order,
//! and ends it; `commit` publishes everything at once. A sink that is dropped without `commit` must
//! leave nothing that looks like a finished output.

pub mod parts;
pub mod puller;
pub mod safetensors;
pub mod torch_save;

pub use puller::{OutputFile, OutputSet, Piece, Puller, Segment, drive};

use crate::error::{Error, ErrorKind, Result};
use crate::io::Input;
use std::collections::BTreeMap;

/// Receives output files as ordered byte streams.
pub trait Sink {
    /// Starts file `name` of exactly `size` bytes.
    fn begin(&mut self, name: &str, size: u64) -> Result<()>;
    /// Appends bytes to the current file.
    fn write(&mut self, buf: &[u8]) -> Result<()>;
    /// Appends a whole buffer the caller is done with. A sink that writes in the background may take the
    /// buffer and leave another in its place (of any length and content) instead of copying it.
    fn write_owned(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        self.write(buf)
    }
    /// The current file for positional writes from worker threads, when this sink can give one. A tensor
    /// written that way is then passed over with [`Sink::skip`].
    fn positional(&mut self) -> Option<crate::io::Positional> {
        None
    }
    /// Moves past `len` bytes that were written positionally (only called after [`Sink::positional`] gave a file).
    fn skip(&mut self, len: u64) -> Result<()> {
        let _ = len;
        Err(Error::new(ErrorKind::Output("internal: this sink has no positional writes".into())))
    }
    /// Ends the current file.
    fn end(&mut self) -> Result<()>;
    /// Publishes every file ended so far; called once after the last file.
    fn commit(&mut self) -> Result<()>;
    /// Appends `len` bytes of `input` at `offset` without passing them through the caller, when this sink
    /// can (native files: an in-kernel copy, as `cp` does). Returns `false` to have the caller read and
    /// `write` them instead; the bytes written are the same either way.
    fn copy_range(&mut self, input: &Input, offset: u64, len: u64) -> Result<bool> {
        let _ = (input, offset, len);
        Ok(false)
    }
}

/// A sink that keeps files in memory, for tests and small outputs.
#[derive(Debug, Default)]
pub struct MemorySink {
    /// Finished files by name (filled by `commit`).
    pub files: BTreeMap<String, Vec<u8>>,
    pending: Vec<(String, Vec<u8>)>,
    current: Option<(String, Vec<u8>)>,
}

impl Sink for MemorySink {
    fn begin(&mut self, name: &str, size: u64) -> Result<()> {
        self.current = Some((name.to_string(), Vec::with_capacity(size as usize)));
        Ok(())
    }
    fn write(&mut self, buf: &[u8]) -> Result<()> {
        if let Some((_, v)) = &mut self.current {
            v.extend_from_slice(buf);
        }
        Ok(())
    }
    fn end(&mut self) -> Result<()> {
        if let Some(f) = self.current.take() {
            self.pending.push(f);
        }
        Ok(())
    }
    fn commit(&mut self) -> Result<()> {
        self.files.extend(self.pending.drain(..));
        Ok(())
    }
}
