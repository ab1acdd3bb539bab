//! The one error type of the core: a kind plus the file it concerns.
//!
//! Every failure names the input (or output) file and says what is wrong in words a user can act on.
//! Callers that only need a category use [`Error::kind`]; the CLI prints the `Display` form.

use std::fmt;

/// What went wrong, without the file name (attached by [`Error::in_file`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing failed at the operating-system level.
    Io(String),
    /// The file ends before a structure it announces.
    Truncated(String),
    /// The zip container is malformed or uses a feature torch never writes.
    Zip(String),
    /// The pickle stream is malformed or uses an unsupported opcode.
    Pickle {
        /// Byte offset of the opcode.
        offset: u64,
        /// What is wrong.
        msg: String,
    },
    /// A safety limit (depth, memo, object count, sizes) was hit.
    Limit(String),
    /// The pickle calls a global that can execute code; it was never called.
    UnsafeGlobal {
        /// `module.name` of the refused callable.
        global: String,
        /// Byte offset of the call in the pickle.
        offset: u64,
    },
    /// The file is not any format ckptconv reads.
    NotCheckpoint(String),
    /// A tensor's metadata is inconsistent (shape, strides, storage, dtype).
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// The parts of a checkpoint disagree with each other or with the base model.
    Inconsistent(String),
    /// Nothing to convert.
    NoTensors(String),
    /// A valid file with a feature ckptconv does not support.
    Unsupported(String),
    /// The output cannot be written as asked.
    Output(String),
    /// A written output does not check out.
    Verify(String),
    /// A configuration file or option is missing or wrong.
    Config(String),
}

/// A failure, naming the file it concerns when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    file: Option<String>,
    kind: ErrorKind,
}

/// Result alias used across the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with no file attached yet.
    pub fn new(kind: ErrorKind) -> Self {
        Error { file: None, kind }
    }

    /// Attaches `file` unless a more specific file is already named.
    pub fn in_file(mut self, file: &str) -> Self {
        if self.file.is_none() {
            self.file = Some(file.to_string());
        }
        self
    }

    /// The category of the failure.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The file the error concerns, if known.
    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }

    /// A short stable label for the kind, used by tests and machine-readable output.
    pub fn label(&self) -> &'static str {
        match self.kind {
            ErrorKind::Io(_) => "io",
            ErrorKind::Truncated(_) => "truncated",
            ErrorKind::Zip(_) => "zip",
            ErrorKind::Pickle { .. } => "pickle",
            ErrorKind::Limit(_) => "limit",
            ErrorKind::UnsafeGlobal { .. } => "unsafe-global",
            ErrorKind::NotCheckpoint(_) => "not-checkpoint",
            ErrorKind::Tensor { .. } => "tensor",
            ErrorKind::Inconsistent(_) => "inconsistent",
            ErrorKind::NoTensors(_) => "no-tensors",
            ErrorKind::Unsupported(_) => "unsupported",
            ErrorKind::Output(_) => "output",
            ErrorKind::Verify(_) => "verify",
            ErrorKind::Config(_) => "config",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Io(m) => write!(f, "I/O error: {m}"),
            ErrorKind::Truncated(m) => write!(f, "file is truncated: {m}"),
            ErrorKind::Zip(m) => write!(f, "bad zip archive: {m}"),
            ErrorKind::Pickle { offset, msg } => write!(f, "bad pickle at byte {offset}: {msg}"),
            ErrorKind::Limit(m) => write!(f, "safety limit exceeded: {m}"),
            ErrorKind::UnsafeGlobal { global, offset } => write!(
                f,
                "refused to call {global} (pickle byte {offset}): it can run code and is not a torch tensor; ckptconv never executes anything from a checkpoint"
            ),
            ErrorKind::NotCheckpoint(m) => write!(f, "not a torch checkpoint: {m}"),
            ErrorKind::Tensor { name, msg } => write!(f, "tensor '{name}': {msg}"),
            ErrorKind::Inconsistent(m) => write!(f, "inconsistent checkpoint: {m}"),
            ErrorKind::NoTensors(m) => write!(f, "no tensors to convert: {m}"),
            ErrorKind::Unsupported(m) => write!(f, "unsupported: {m}"),
            ErrorKind::Output(m) => write!(f, "cannot write output: {m}"),
            ErrorKind::Verify(m) => write!(f, "verification failed: {m}"),
            ErrorKind::Config(m) => write!(f, "bad configuration: {m}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{file}: {}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl std::error::Error for Error {}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Error::new(kind)
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        std::io::Error::other(e.to_string())
    }
}

/// The first `shown` of `names`, comma-separated, and how many more there are: name lists in messages.
pub(crate) fn some_names<S: AsRef<str>>(names: &[S], shown: usize) -> String {
    let mut s = names.iter().take(shown).map(AsRef::as_ref).collect::<Vec<_>>().join(", ");
    if names.len() > shown {
        s.push_str(&format!(" and {} more", names.len() - shown));
    }
    s
}

/// Shorthand constructors used throughout the parsers.
pub(crate) fn tensor_err(name: &str, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Tensor { name: name.to_string(), msg: msg.into() })
}
