//! `http(s)://` inputs. The WASI module of the npm package's CLI (`npx ckptconv`, feature `host-url`) asks its host
//! for the bytes through three imports; the host (js/cli.js under Node) reads them with HTTP Range requests,
//! retries and checks. Other builds read files only and say where URLs are read.

use ckptconv::io::Input;
#[cfg(all(feature = "host-url", target_os = "wasi"))]
use ckptconv::io::ReadAt;
use ckptconv::{Error, ErrorKind, Result};

/// Whether a command-line input names a URL rather than a path.
pub fn is_url(path: &std::path::Path) -> bool {
    let s = path.to_string_lossy();
    let lower = s.get(..8).unwrap_or(&s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

#[cfg(all(feature = "host-url", target_os = "wasi"))]
mod host {
    #[link(wasm_import_module = "ckptconv_host")]
    unsafe extern "C" {
        /// Opens a URL: a handle (>= 0) with its size written to `size`, or minus the length of an error message.
        pub fn url_open(url: *const u8, url_len: usize, size: *mut u64) -> i32;
        /// Reads `len` bytes at `offset` into `buf`: 0, or minus the length of an error message.
        pub fn url_read(handle: i32, offset: u64, buf: *mut u8, len: usize) -> i32;
        /// Says that these ranges (`count` pairs of u64: offset, length) are read soon, each by one read: the host
        /// fetches them at once.
        pub fn url_prefetch(handle: i32, ranges: *const u64, count: usize);
        /// Copies the last error message into `buf` (at most `cap` bytes); returns its length.
        pub fn last_error(buf: *mut u8, cap: usize) -> usize;
        /// Queues a copy of bytes `offset .. offset + len` of the URL into the file at `path` (a host path) from
        /// its byte `at`; the host writes it while the module goes on.
        pub fn url_copy(handle: i32, offset: u64, len: u64, path: *const u8, path_len: usize, at: u64);
        /// Waits until every queued copy is written (`cancel` 0) or drops those not begun (1): 0; minus the length
        /// of an error message when reading the URL failed; a Linux errno when writing failed (its message through
        /// `last_error` too). On failure the failed read's offset is written to `offset`.
        pub fn url_flush(cancel: i32, offset: *mut u64) -> i32;
    }

    /// The host's last error message.
    pub fn error() -> String {
        let mut buf = vec![0u8; 4096];
        // SAFETY: the host writes at most `cap` bytes into the buffer it is given.
        let n = unsafe { last_error(buf.as_mut_ptr(), buf.len()) }.min(buf.len());
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// A file behind a URL, read through the host.
#[cfg(all(feature = "host-url", target_os = "wasi"))]
struct UrlReadAt {
    handle: i32,
    len: u64,
}

#[cfg(all(feature = "host-url", target_os = "wasi"))]
impl ReadAt for UrlReadAt {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end of the file"));
        }
        // SAFETY: the host writes exactly `buf.len()` bytes into `buf`, or nothing when it fails.
        let r = unsafe { host::url_read(self.handle, offset, buf.as_mut_ptr(), buf.len()) };
        if r < 0 { Err(std::io::Error::other(host::error())) } else { Ok(()) }
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn prefetch(&self, ranges: &[(u64, u64)]) {
        // A hint: the host keeps what it fetched until it is read, so an absurd count is not passed on.
        if ranges.is_empty() || ranges.len() > MAX_PREFETCH {
            return;
        }
        let flat: Vec<u64> = ranges.iter().flat_map(|&(o, l)| [o, l]).collect();
        // SAFETY: the host reads `ranges.len()` pairs of u64 from `flat` during the call.
        unsafe { host::url_prefetch(self.handle, flat.as_ptr(), ranges.len()) }
    }
}

/// Most ranges one prefetch hint passes to the host (a checkpoint's storages; each a few bytes there).
#[cfg(all(feature = "host-url", target_os = "wasi"))]
const MAX_PREFETCH: usize = 1 << 16;

/// Why copies straight from a URL into a file failed.
#[cfg(all(feature = "host-url", target_os = "wasi"))]
pub enum CopyError {
    /// Reading the URL at this offset (the message names no URL: the caller's error does).
    Read(u64, String),
    /// Writing the file.
    Write(std::io::Error),
}

/// Has the host write bytes `offset .. offset + len` of `input` into the file at `path` from its byte `at`, when
/// `input` is a URL (else `false`): the bytes then go from the socket to the file in the host's own buffers, never
/// through the module, while the module goes on (README: `npx ckptconv` from a URL). [`flush_copies`] waits.
#[cfg(all(feature = "host-url", target_os = "wasi"))]
pub fn copy_into(input: &Input, offset: u64, len: u64, path: &std::path::Path, at: u64) -> bool {
    let Some(src) = input.data.as_any().and_then(|a| a.downcast_ref::<UrlReadAt>()) else { return false };
    let path = path.to_string_lossy();
    // SAFETY: the host reads `path` during the call and nothing else of ours.
    unsafe { host::url_copy(src.handle, offset, len, path.as_ptr(), path.len(), at) };
    true
}

/// Waits for the copies [`copy_into`] queued; `cancel` drops those not begun (after a failure elsewhere).
#[cfg(all(feature = "host-url", target_os = "wasi"))]
pub fn flush_copies(cancel: bool) -> std::result::Result<(), CopyError> {
    let mut offset = 0u64;
    // SAFETY: the host writes one u64 into `offset`.
    match unsafe { host::url_flush(i32::from(cancel), &mut offset) } {
        0 => Ok(()),
        r if r < 0 => Err(CopyError::Read(offset, host::error())),
        linux => Err(CopyError::Write(crate::fsio::io_error_from_linux(linux))),
    }
}

/// Opens `url` as an input named by the URL as given.
#[cfg(all(feature = "host-url", target_os = "wasi"))]
pub fn open(url: &str) -> Result<Input> {
    let mut size = 0u64;
    // SAFETY: the host reads `url` and writes one u64 into `size`.
    let handle = unsafe { host::url_open(url.as_ptr(), url.len(), &mut size) };
    if handle < 0 {
        return Err(Error::new(ErrorKind::Io(host::error())).in_file(url));
    }
    Ok(Input::new(url, Box::new(UrlReadAt { handle, len: size })))
}

/// Builds without a host that reads URLs refuse them, saying which one does.
#[cfg(not(all(feature = "host-url", target_os = "wasi")))]
pub fn open(url: &str) -> Result<Input> {
    Err(Error::new(ErrorKind::Io(
        "this build reads files only; `npx ckptconv` (the npm package) reads http(s) URLs, or download the file first"
            .into(),
    ))
    .in_file(url))
}
