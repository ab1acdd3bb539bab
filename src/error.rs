//! The one error type of the core: a kind plus the file it concerns.
//!
//! Every failure names the input (or output) file and says what is wrong in words a user can act on.
//! Callers that only need a category use [`Error::kind`]; the CLI prints the `Display` form.
//! Text from a file (names, bytes) reaches a terminal or the page only through [`display_safe`]: the `Display`
//! of [`Error`] applies it, and the front ends apply it to every file-derived string they print.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

/// What went wrong, without the file name (attached by [`Error::in_file`]). Its `Display` is the message the
/// CLI and the page show after the file name; tests compare these texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing failed at the operating-system level.
    #[error("I/O error: {0}")]
    Io(String),
    /// The file ends before a structure it announces.
    #[error("file is truncated: {0}")]
    Truncated(String),
    /// The zip container is malformed or uses a feature torch never writes.
    #[error("bad zip archive: {0}")]
    Zip(String),
    /// The pickle stream is malformed or uses an unsupported opcode.
    #[error("bad pickle at byte {offset}: {msg}")]
    Pickle {
        /// Byte offset of the opcode.
        offset: u64,
        /// What is wrong.
        msg: String,
    },
    /// A safety limit (depth, memo, object count, sizes) was hit.
    #[error("safety limit exceeded: {0}")]
    Limit(String),
    /// The pickle would call globals that are not on the allowlist (the pickle reader's policy); none was called.
    #[error("{}", unsafe_globals_message(calls, named))]
    UnsafeGlobal {
        /// Each refused call: the global and where.
        calls: Vec<GlobalUse>,
        /// Globals off the allowlist that the pickle names without calling them.
        named: Vec<GlobalUse>,
    },
    /// The file is not any format ckptconv reads.
    #[error("not a torch checkpoint: {0}")]
    NotCheckpoint(String),
    /// A tensor's metadata is inconsistent (shape, strides, storage, dtype).
    #[error("tensor '{name}': {msg}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// The parts of a checkpoint disagree with each other or with the base model.
    #[error("inconsistent checkpoint: {0}")]
    Inconsistent(String),
    /// Nothing to convert.
    #[error("no tensors to convert: {0}")]
    NoTensors(String),
    /// A valid file with a feature ckptconv does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The output cannot be written as asked.
    #[error("cannot write output: {0}")]
    Output(String),
    /// A written output does not check out.
    #[error("verification failed: {0}")]
    Verify(String),
    /// A configuration file or option is missing or wrong.
    #[error("bad configuration: {0}")]
    Config(String),
}

/// A global a pickle uses, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalUse {
    /// `module.name`.
    pub global: String,
    /// Byte offset of the opcode in the pickle.
    pub offset: u64,
    /// How it is used (`called by REDUCE`, `class given to copyreg._reconstructor`, ...).
    pub how: String,
}

/// Most globals a message lists of each kind; the rest are counted.
const LISTED: usize = 16;

fn list_uses(uses: &[GlobalUse], with_how: bool) -> String {
    let mut text: Vec<String> = uses
        .iter()
        .take(LISTED)
        .map(|u| {
            if with_how {
                format!("{} ({}, pickle byte {})", u.global, u.how, u.offset)
            } else {
                format!("{} (pickle byte {})", u.global, u.offset)
            }
        })
        .collect();
    if uses.len() > LISTED {
        text.push(format!("and {} more", uses.len() - LISTED));
    }
    text.join(", ")
}

/// Whether `s` is `module.name` as a pickle's GLOBAL spells a Python global: identifier parts joined by dots.
pub fn is_dotted_name(s: &str) -> bool {
    s.split('.').count() >= 2
        && s.split('.').all(|part| !part.is_empty() && part.chars().all(|c| c == '_' || c.is_alphanumeric()))
}

fn unsafe_globals_message(calls: &[GlobalUse], named: &[GlobalUse]) -> String {
    let mut msg = format!(
        "refused: the pickle would call {} not on ckptconv's allowlist of data: {}",
        if calls.len() == 1 { "a global" } else { "globals" },
        list_uses(calls, true)
    );
    if !named.is_empty() {
        msg.push_str(&format!("; it also names {} without calling it", list_uses(named, false)));
    }
    let flags: Vec<String> = calls
        .iter()
        .filter(|u| is_dotted_name(&u.global))
        .take(LISTED)
        .map(|u| format!("--allow-global {}", u.global))
        .collect();
    msg.push_str(&format!(
        ". Nothing was run (ckptconv never executes anything from a checkpoint), but torch.load(weights_only=False) \
         would make {}",
        if calls.len() == 1 { "that call" } else { "these calls" }
    ));
    if !flags.is_empty() {
        msg.push_str(&format!(". Only if you trust this file: {}", flags.join(" ")));
    }
    msg
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

    /// Adds `text` to the end of the message (kinds whose message is one text; others are left as they are).
    pub fn with_more(mut self, text: &str) -> Self {
        match &mut self.kind {
            ErrorKind::Io(m)
            | ErrorKind::Truncated(m)
            | ErrorKind::Zip(m)
            | ErrorKind::Pickle { msg: m, .. }
            | ErrorKind::Limit(m)
            | ErrorKind::NotCheckpoint(m)
            | ErrorKind::Inconsistent(m)
            | ErrorKind::Unsupported(m)
            | ErrorKind::Tensor { msg: m, .. } => m.push_str(text),
            _ => {}
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

/// The line a user sees, escaped by [`display_safe`]: names in it come from the file and may hold terminal
/// controls (`ESC[2K\r` would erase the line and print over it). [`Error::kind`] and [`Error::file`] stay exact.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match &self.file {
            Some(file) => format!("{file}: {}", self.kind),
            None => self.kind.to_string(),
        };
        f.write_str(&display_safe(&text))
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

/// Whether `c` must not reach a terminal or the page as itself: every control character (C0 such as NUL, BEL,
/// ESC, CR and LF; DEL; C1 such as U+009B, which some terminals take as CSI), the bidi overrides, embeddings,
/// isolates and marks that reorder what is shown (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C), and
/// invisible characters that make two names look alike (zero-width spaces and joiners, word joiner, invisible
/// operators, the BOM, soft hyphen, Hangul fillers, interlinear annotations, tag characters, line and paragraph
/// separators).
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{ad}'
                | '\u{61c}'
                | '\u{115f}'
                | '\u{1160}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206f}'
                | '\u{3164}'
                | '\u{feff}'
                | '\u{ffa0}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

/// `s` as it may be shown to a person: every [`is_unsafe_char`] becomes a visible escape (`\x1b` for C0 and
/// DEL, `\u{202e}` for the rest), everything else, ASCII names and non-ASCII letters alike, is left as it is (and
/// borrowed). Invalid UTF-8 never gets here: the readers refuse it or decode it lossily (U+FFFD, visible).
/// Backslashes are not doubled, so the escaped form is for reading; the JSON output is the exact one.
pub fn display_safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            c if !is_unsafe_char(c) => out.push(c),
            c if (c as u32) < 0x80 => _ = write!(out, "\\x{:02x}", c as u32),
            c => _ = write!(out, "\\u{{{:x}}}", c as u32),
        }
    }
    Cow::Owned(out)
}

/// JSON text as it may be printed: each [`is_unsafe_char`] that JSON leaves raw (DEL, C1, bidi and invisible
/// characters) becomes its `\uXXXX` escape. JSON escapes C0 controls inside strings itself, so those in the text
/// are its own line breaks and stay; the others only occur inside strings, so the document parses back to
/// exactly the same values.
pub fn json_safe(json: &str) -> Cow<'_, str> {
    let raw_unsafe = |c: char| c >= '\u{7f}' && is_unsafe_char(c);
    if !json.chars().any(raw_unsafe) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    let mut units = [0u16; 2];
    for c in json.chars() {
        if raw_unsafe(c) {
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Shorthand constructors used throughout the parsers.
pub(crate) fn tensor_err(name: &str, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Tensor { name: name.to_string(), msg: msg.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI, the page and their tests match these texts: each kind's message, byte for byte.
    #[test]
    fn every_kind_keeps_its_message() {
        let m = || "m".to_string();
        let cases = [
            (ErrorKind::Io(m()), "I/O error: m"),
            (ErrorKind::Truncated(m()), "file is truncated: m"),
            (ErrorKind::Zip(m()), "bad zip archive: m"),
            (ErrorKind::Pickle { offset: 7, msg: m() }, "bad pickle at byte 7: m"),
            (ErrorKind::Limit(m()), "safety limit exceeded: m"),
            (
                ErrorKind::UnsafeGlobal {
                    calls: vec![GlobalUse { global: "os.system".into(), offset: 9, how: "called by REDUCE".into() }],
                    named: vec![],
                },
                "refused: the pickle would call a global not on ckptconv's allowlist of data: os.system (called by \
                 REDUCE, pickle byte 9). Nothing was run (ckptconv never executes anything from a checkpoint), but \
                 torch.load(weights_only=False) would make that call. Only if you trust this file: --allow-global os.system",
            ),
            (ErrorKind::NotCheckpoint(m()), "not a torch checkpoint: m"),
            (ErrorKind::Tensor { name: "w".into(), msg: m() }, "tensor 'w': m"),
            (ErrorKind::Inconsistent(m()), "inconsistent checkpoint: m"),
            (ErrorKind::NoTensors(m()), "no tensors to convert: m"),
            (ErrorKind::Unsupported(m()), "unsupported: m"),
            (ErrorKind::Output(m()), "cannot write output: m"),
            (ErrorKind::Verify(m()), "verification failed: m"),
            (ErrorKind::Config(m()), "bad configuration: m"),
        ];
        for (kind, want) in cases {
            assert_eq!(kind.to_string(), want);
            assert_eq!(Error::new(kind).in_file("f.pt").to_string(), format!("f.pt: {want}"));
        }
    }

    #[test]
    fn display_safe_escapes_controls_bidi_and_invisibles_only() {
        for plain in ["model.layers.0.self_attn.q_proj.weight", "模型.权重", "poids.équipe", "a\\x1b", ""] {
            assert!(matches!(display_safe(plain), Cow::Borrowed(_)), "{plain:?}");
        }
        let cases = [
            ("a\x1b[2K\rOK", "a\\x1b[2K\\x0dOK"),
            ("\0\x07\x08\t\n\x0b\x0c\x7f", "\\x00\\x07\\x08\\x09\\x0a\\x0b\\x0c\\x7f"),
            ("csi\u{9b}2J\u{85}", "csi\\u{9b}2J\\u{85}"),
            ("w\u{202e}gnp.exe", "w\\u{202e}gnp.exe"),
            (
                "\u{2066}x\u{2069}\u{200b}\u{200d}\u{200f}\u{feff}\u{2028}",
                "\\u{2066}x\\u{2069}\\u{200b}\\u{200d}\\u{200f}\\u{feff}\\u{2028}",
            ),
            ("tag\u{e0041}", "tag\\u{e0041}"),
        ];
        for (raw, want) in cases {
            assert_eq!(display_safe(raw), want);
            assert!(!display_safe(raw).chars().any(is_unsafe_char));
        }
    }

    /// An error line never carries a raw control, whichever part (file, tensor name, message) holds it.
    #[test]
    fn error_display_is_escaped_and_the_parts_stay_exact() {
        let e = tensor_err("w\x1b[2K\rOK", "bad\u{202e}").in_file("dir\n/f.pt");
        assert_eq!(e.to_string(), "dir\\x0a/f.pt: tensor 'w\\x1b[2K\\x0dOK': bad\\u{202e}");
        assert_eq!(e.file(), Some("dir\n/f.pt"));
        assert!(matches!(e.kind(), ErrorKind::Tensor { name, .. } if name == "w\x1b[2K\rOK"));
    }

    #[test]
    fn json_safe_keeps_the_values() {
        let names = ["plain", "a\x1b[2K\rOK\x7f", "\u{9b}\u{202e}\u{2066}\u{200b}\u{feff}", "tag\u{e0041}", "模型"];
        let doc = serde_json::json!({ "names": names });
        let text = format!("{doc:#}");
        let safe = json_safe(&text);
        assert!(!safe.chars().any(|c| c != '\n' && is_unsafe_char(c)), "{safe}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&safe).unwrap(), doc);
        let plain = format!("{:#}", serde_json::json!({ "names": ["a.b", "模型"] }));
        assert!(matches!(json_safe(&plain), Cow::Borrowed(_)));
    }
}
