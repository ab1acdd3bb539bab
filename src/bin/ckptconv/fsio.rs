//! Files on disk for the CLI (native and WASI): a [`ReadAt`] over `std::fs::File` and a sink that
//! writes each output to a hidden temp name and renames everything only after the last byte.

use ckptconv::io::ReadAt;
use ckptconv::write::Sink;
use ckptconv::{Error, ErrorKind, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// An I/O error's text; under WASI a missing path is usually one outside the folders the host opened.
pub fn io_text(e: &std::io::Error) -> String {
    // Under `npx ckptconv` the host opens the whole file system: the error is the native binary's, Linux's number
    // included (WASI numbers errors its own way).
    #[cfg(all(feature = "host-url", target_os = "wasi"))]
    if let Some(code) = e.raw_os_error() {
        let text = e.to_string();
        let cut = text.rfind(" (os error ").unwrap_or(text.len());
        let linux = usize::try_from(code).ok().and_then(|c| LINUX_ERRNO.get(c)).copied().unwrap_or(code);
        return format!("{} (os error {linux})", &text[..cut]);
    }
    let outside = matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied);
    if cfg!(target_os = "wasi") && !cfg!(feature = "host-url") && outside {
        return format!("{e} (under WASI only the folders given with --dir are visible)");
    }
    e.to_string()
}

/// Linux's errno for each WASI preview1 errno (its index), so that `npx ckptconv` prints the native numbers.
#[cfg(all(feature = "host-url", target_os = "wasi"))]
const LINUX_ERRNO: [i32; 77] = [
    0, 7, 13, 98, 99, 97, 11, 114, 9, 74, 16, 125, 10, 103, 111, 104, 35, 89, 33, 122, 17, 14, 27, 113, 43, 84, 115, 4,
    22, 5, 106, 21, 40, 24, 31, 90, 72, 36, 100, 102, 101, 23, 105, 19, 2, 8, 37, 67, 12, 42, 92, 28, 38, 107, 20, 39,
    131, 88, 95, 25, 6, 75, 130, 1, 32, 71, 93, 91, 34, 30, 29, 3, 116, 110, 26, 18, 1,
];

/// The I/O error Linux's errno `linux` stands for, as this build numbers it (WASI's numbering), so that it reads
/// as the native binary's through [`io_text`].
#[cfg(all(feature = "host-url", target_os = "wasi"))]
pub fn io_error_from_linux(linux: i32) -> std::io::Error {
    match LINUX_ERRNO.iter().position(|&l| l == linux).and_then(|w| i32::try_from(w).ok()) {
        Some(wasi) if wasi > 0 => std::io::Error::from_raw_os_error(wasi),
        _ => std::io::Error::other(format!("the host's write failed (errno {linux})")),
    }
}

/// Largest single read or write where the host copies through a buffer of its own (WASI: the engine reads into
/// and writes from a host buffer, which it zeroes first). Pieces this size stay in the CPU's cache on their way;
/// bands of 16 MiB would stream through memory two extra times.
#[cfg(not(unix))]
const IO_CHUNK: usize = 256 << 10;

/// A file opened for random-access reads.
pub struct FileInput {
    file: File,
    len: u64,
    #[cfg(not(unix))]
    pos: std::cell::Cell<u64>,
    #[cfg(target_os = "linux")]
    ahead: ReadAhead,
}

/// Asks the kernel to read ahead of sequential reads (`posix_fadvise(WILLNEED)`): the disk reads the next band
/// while the current one is cast or gathered and the writer thread writes the previous one. The kernel's own
/// read-ahead covers small sequential reads but not the pause between two band-sized ones.
#[cfg(target_os = "linux")]
#[derive(Default)]
struct ReadAhead {
    /// Where the last read ended (a read starting there continues a sequential run).
    end: std::sync::atomic::AtomicU64,
    /// How far read-ahead has been asked for.
    asked: std::sync::atomic::AtomicU64,
    /// Where the current sequential run started.
    run_start: std::sync::atomic::AtomicU64,
}

/// How far ahead of a sequential read the kernel is asked to read: two bands.
#[cfg(target_os = "linux")]
const READ_AHEAD: u64 = 2 * ckptconv::plan::BAND_BYTES as u64;
/// How long a run must be before read-ahead is asked for: short runs between jumps (a pickle's records, a zip's
/// headers, one small tensor each) are left to the kernel's own read-ahead.
#[cfg(target_os = "linux")]
const READ_AHEAD_AFTER: u64 = 1 << 20;
/// One request's length (the kernel caps each at its read-ahead window, commonly larger than this).
#[cfg(target_os = "linux")]
const READ_AHEAD_STEP: u64 = 4 << 20;

#[cfg(target_os = "linux")]
impl ReadAhead {
    fn after_read(&self, file: &File, offset: u64, len: u64, file_len: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let end = offset.saturating_add(len);
        let last_end = self.end.swap(end, Relaxed);
        let asked = self.asked.load(Relaxed);
        // A read that starts at or after the last one's end but inside the range already asked for (a padding gap
        // between tensors of a flat partition, say) continues the run: the asked range is never asked again.
        let continuing = offset >= last_end && offset <= asked.max(last_end);
        if !continuing {
            self.asked.store(end, Relaxed);
            self.run_start.store(offset, Relaxed);
            return;
        }
        if end - self.run_start.load(Relaxed).min(end) < READ_AHEAD_AFTER {
            return;
        }
        // Asked again only when less than half the window is left, so that small reads cost no system call each.
        if asked >= end.saturating_add(READ_AHEAD / 2).min(file_len) {
            return;
        }
        let want = end.saturating_add(READ_AHEAD).min(file_len);
        let mut at = asked.max(end);
        while at < want {
            let n = READ_AHEAD_STEP.min(want - at);
            fadvise_willneed(file, at, n);
            at += n;
        }
        self.asked.store(at, Relaxed);
    }
}

/// A hint only: any failure (a filesystem without read-ahead, a pipe) is ignored.
#[cfg(target_os = "linux")]
fn fadvise_willneed(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    unsafe extern "C" {
        fn posix_fadvise(fd: i32, offset: i64, len: i64, advice: i32) -> i32;
    }
    const POSIX_FADV_WILLNEED: i32 = 3;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: the descriptor is open for the call's duration (borrowed from `file`); the call reads no memory of ours.
    let _ = unsafe { posix_fadvise(file.as_raw_fd(), offset, len, POSIX_FADV_WILLNEED) };
}

impl FileInput {
    pub fn open(path: &Path) -> Result<FileInput> {
        let io = |e: std::io::Error| Error::new(ErrorKind::Io(io_text(&e))).in_file(&path.display().to_string());
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            return Err(Error::new(ErrorKind::NotCheckpoint("is a folder, expected a file".into()))
                .in_file(&path.display().to_string()));
        }
        Ok(FileInput {
            file,
            len: meta.len(),
            #[cfg(not(unix))]
            pos: std::cell::Cell::new(u64::MAX),
            #[cfg(target_os = "linux")]
            ahead: ReadAhead::default(),
        })
    }
}

impl ReadAt for FileInput {
    fn len(&self) -> u64 {
        self.len
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    #[cfg(unix)]
    fn sendable(&self) -> Option<Box<dyn ReadAt + Send + Sync>> {
        let file = self.file.try_clone().ok()?;
        Some(Box::new(FileInput {
            file,
            len: self.len,
            #[cfg(target_os = "linux")]
            ahead: ReadAhead::default(),
        }))
    }

    #[cfg(unix)]
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)?;
        #[cfg(target_os = "linux")]
        self.ahead.after_read(&self.file, offset, buf.len() as u64, self.len);
        Ok(())
    }

    #[cfg(not(unix))]
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = &self.file;
        if self.pos.get() != offset {
            f.seek(SeekFrom::Start(offset))?;
        }
        for piece in buf.chunks_mut(IO_CHUNK) {
            f.read_exact(piece)?;
        }
        self.pos.set(offset + buf.len() as u64);
        Ok(())
    }
}

/// Writes files into a folder through temp names; nothing is published before `commit`.
pub struct DirSink {
    dir: PathBuf,
    force: bool,
    current: Option<(FileWriter, PathBuf, PathBuf)>,
    staged: Vec<(PathBuf, PathBuf)>,
    committed: bool,
    /// The URL whose bytes the host is copying into the current file, if any (`npx ckptconv`).
    #[cfg(all(feature = "host-url", target_os = "wasi"))]
    host_copies: Option<String>,
}

impl DirSink {
    pub fn new(dir: &Path, force: bool) -> Result<DirSink> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::new(ErrorKind::Output(format!("cannot create the folder: {}", io_text(&e))))
                .in_file(&dir.display().to_string())
        })?;
        Ok(DirSink {
            dir: dir.to_path_buf(),
            force,
            current: None,
            staged: Vec::new(),
            committed: false,
            #[cfg(all(feature = "host-url", target_os = "wasi"))]
            host_copies: None,
        })
    }

    /// Fails if any of `names` exists and `--force` was not given.
    pub fn check_free(&self, names: &[String]) -> Result<()> {
        if self.force {
            return Ok(());
        }
        for n in names {
            let p = self.dir.join(n);
            if p.exists() {
                return Err(Error::new(ErrorKind::Output("already exists; pass --force to overwrite".into()))
                    .in_file(&p.display().to_string()));
            }
        }
        Ok(())
    }

    fn out_err(path: &Path, e: std::io::Error) -> Error {
        Error::new(ErrorKind::Output(io_text(&e))).in_file(&path.display().to_string())
    }

    /// Waits for the current file's last bytes: the host's copies (`npx ckptconv`), then the writer.
    fn finish_file(&mut self, f: FileWriter, tmp: &Path) -> Result<()> {
        #[cfg(all(feature = "host-url", target_os = "wasi"))]
        if let Some(url) = self.host_copies.take() {
            crate::hosturl::flush_copies(false).map_err(|e| match e {
                crate::hosturl::CopyError::Write(e) => Self::out_err(tmp, e),
                crate::hosturl::CopyError::Read(at, m) => {
                    Error::new(ErrorKind::Io(format!("read at {at}: {m}"))).in_file(&url)
                }
            })?;
        }
        f.finish().map_err(|e| Self::out_err(tmp, e))
    }

    /// Runs `op` on the current file's writer; its I/O errors name the temp file.
    fn with_writer(&mut self, op: impl FnOnce(&mut FileWriter) -> std::io::Result<()>) -> Result<()> {
        match &mut self.current {
            Some((f, tmp, _)) => op(f).map_err(|e| Self::out_err(tmp, e)),
            None => Err(Error::new(ErrorKind::Output("write outside a file".into()))),
        }
    }
}

impl Sink for DirSink {
    fn begin(&mut self, name: &str, _size: u64) -> Result<()> {
        if name.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(Error::new(ErrorKind::Output(format!("refusing the output name '{name}'"))));
        }
        let fin = self.dir.join(name);
        self.check_free(&[name.to_string()])?;
        let parent = fin.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| Self::out_err(&parent, e))?;
        let file_name = fin.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = parent.join(format!(".{file_name}.ckptconv-partial"));
        let f = File::create(&tmp).map_err(|e| Self::out_err(&tmp, e))?;
        self.current = Some((FileWriter::new(f), tmp, fin));
        Ok(())
    }

    fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.with_writer(|f| f.write(buf))
    }

    fn write_owned(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        self.with_writer(|f| f.write_owned(buf))
    }

    /// Another descriptor on the temp file, for workers that `pwrite` whole tensors at their place.
    #[cfg(unix)]
    fn positional(&mut self) -> Option<ckptconv::io::Positional> {
        let (f, tmp, _) = self.current.as_ref()?;
        let file = f.pos.as_ref()?.try_clone().ok()?;
        Some(ckptconv::io::Positional { name: tmp.display().to_string(), file: Box::new(PosFile(file)) })
    }

    fn skip(&mut self, len: u64) -> Result<()> {
        self.with_writer(|f| f.skip(len))
    }

    fn end(&mut self) -> Result<()> {
        // No fsync: like cp and safetensors' own writer, durability is left to the OS; the rename
        // after the last byte is what keeps an interrupted run from leaving a complete-looking file.
        let Some((f, tmp, fin)) = self.current.take() else { return Ok(()) };
        match self.finish_file(f, &tmp) {
            Ok(()) => {
                self.staged.push((tmp, fin));
                Ok(())
            }
            Err(e) => {
                // No longer the current file, not yet staged: Drop would not find it.
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Verbatim bytes take the buffered path by default: the caller reads 256 KiB pieces while the writer thread
    /// writes the previous ones, so reading and writing overlap. The in-kernel copy (`copy_file_range`, std's
    /// `io::copy` between files on Linux, as `cp` does) runs both in one thread, one after the other, and measured
    /// slower on every input (`bench/bench_io.py`, README: Performance); `CKPTCONV_KERNEL_COPY=1` selects it, for
    /// comparison.
    #[cfg(target_os = "linux")]
    fn copy_range(&mut self, input: &ckptconv::io::Input, offset: u64, len: u64) -> Result<bool> {
        if !kernel_copy_chosen() {
            return Ok(false);
        }
        let Some(src) = input.data.as_any().and_then(|a| a.downcast_ref::<FileInput>()) else {
            return Ok(false);
        };
        let Some((dst, tmp, _)) = &mut self.current else { return Ok(false) };
        let from = src.file.try_clone().map_err(|e| Error::new(ErrorKind::Io(io_text(&e))).in_file(&input.name))?;
        // A short source surfaces as UnexpectedEof from the writer; name both files then.
        dst.copy(from, offset, len).map_err(|e| {
            Error::new(ErrorKind::Output(format!("copying bytes {offset}..{} of {}: {e}", offset + len, input.name)))
                .in_file(&tmp.display().to_string())
        })?;
        Ok(true)
    }

    /// A URL's verbatim bytes are written into the temp file by the host (`npx ckptconv`) while the module goes
    /// on, never passing through the module; its cursor moves past them, and `end` waits for them.
    #[cfg(all(feature = "host-url", target_os = "wasi"))]
    fn copy_range(&mut self, input: &ckptconv::io::Input, offset: u64, len: u64) -> Result<bool> {
        use std::io::Seek;
        let Some((f, tmp, _)) = &mut self.current else { return Ok(false) };
        let at = f.file.stream_position().map_err(|e| Self::out_err(tmp, e))?;
        // The host resolves relative paths from its own working folder, which is the module's (CKPTCONV_HOST_CWD).
        let path = std::env::current_dir().map(|cwd| cwd.join(&*tmp)).unwrap_or_else(|_| tmp.clone());
        if !crate::hosturl::copy_into(input, offset, len, &path, at) {
            return Ok(false);
        }
        self.host_copies.get_or_insert_with(|| input.name.clone());
        f.skip(len).map(|_| true).map_err(|e| Self::out_err(tmp, e))
    }

    fn commit(&mut self) -> Result<()> {
        for (tmp, fin) in &self.staged {
            std::fs::rename(tmp, fin).map_err(|e| Self::out_err(fin, e))?;
        }
        self.committed = true;
        Ok(())
    }
}

/// Whether verbatim bytes move by `copy_file_range` (`CKPTCONV_KERNEL_COPY=1`) rather than the default buffered
/// path; `CKPTCONV_NO_KERNEL_COPY=1`, which chose the buffered path when the kernel copy was the default, wins.
#[cfg(target_os = "linux")]
fn kernel_copy_chosen() -> bool {
    let set = |name| std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0");
    set("CKPTCONV_KERNEL_COPY") && !set("CKPTCONV_NO_KERNEL_COPY")
}

impl Drop for DirSink {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Nothing may write into a temp file once it is removed: copies not begun are dropped, the others awaited.
        #[cfg(all(feature = "host-url", target_os = "wasi"))]
        if self.host_copies.take().is_some() {
            let _ = crate::hosturl::flush_copies(true);
        }
        if let Some((_, tmp, _)) = self.current.take() {
            let _ = std::fs::remove_file(tmp);
        }
        for (tmp, _) in &self.staged {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// A folder on disk, listed once (recursively, within limits) when opened.
pub struct DiskFolder {
    root: PathBuf,
    name: String,
    files: Vec<String>,
}

/// Walk limits: a checkpoint folder is a few levels deep and holds at most thousands of files.
const MAX_DEPTH: usize = 8;
const MAX_FILES: usize = 200_000;

impl DiskFolder {
    pub fn open(root: &Path) -> Result<DiskFolder> {
        DiskFolder::walk(root, MAX_DEPTH)
    }

    /// The folder's own files only (no subfolders): the siblings of a file the user named.
    pub fn open_flat(root: &Path) -> Result<DiskFolder> {
        DiskFolder::walk(root, 1)
    }

    fn walk(root: &Path, max_depth: usize) -> Result<DiskFolder> {
        let name = root.display().to_string();
        let mut files = Vec::new();
        let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
        while let Some((dir, rel, depth)) = stack.pop() {
            let entries = std::fs::read_dir(&dir)
                .map_err(|e| Error::new(ErrorKind::Io(io_text(&e))).in_file(&dir.display().to_string()))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::new(ErrorKind::Io(io_text(&e))).in_file(&name))?;
                let fname = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                let child = if rel.is_empty() { fname } else { format!("{rel}/{fname}") };
                // Follows links like the rest of the CLI; the depth cap ends loops.
                let meta = std::fs::metadata(&path);
                match meta {
                    Ok(m) if m.is_dir() => {
                        if depth + 1 < max_depth {
                            stack.push((path, child, depth + 1));
                        }
                    }
                    Ok(_) => files.push(child),
                    Err(_) => {}
                }
                if files.len() > MAX_FILES {
                    return Err(Error::new(ErrorKind::Limit(format!("more than {MAX_FILES} files below the folder")))
                        .in_file(&name));
                }
            }
        }
        files.sort();
        Ok(DiskFolder { root: root.to_path_buf(), name, files })
    }
}

impl ckptconv::io::Folder for DiskFolder {
    fn name(&self) -> &str {
        &self.name
    }

    fn files(&self) -> Vec<String> {
        self.files.clone()
    }

    fn open(&self, rel: &str) -> Result<ckptconv::io::Input> {
        let path = self.root.join(rel);
        let data = FileInput::open(&path)?;
        Ok(ckptconv::io::Input::new(path.display().to_string(), Box::new(data)))
    }
}

/// A file written with `pwrite` from worker threads.
#[cfg(unix)]
struct PosFile(File);

#[cfg(unix)]
impl ckptconv::io::WriteAt for PosFile {
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
    }
}

/// Moves `file`'s cursor past `len` bytes that were written positionally.
fn seek_past(file: &mut File, len: u64) -> std::io::Result<()> {
    use std::io::Seek;
    let n = i64::try_from(len).map_err(std::io::Error::other)?;
    file.seek(std::io::SeekFrom::Current(n)).map(|_| ())
}

/// Writes one output file. Natively a thread does the writing, so the next bands are read, cast or merged
/// while earlier ones go to disk (at most two bands queued). WASI has no threads and writes in place.
pub struct FileWriter {
    /// Another descriptor on the same file, for positional writes (the writer thread's own one keeps the cursor).
    #[cfg(unix)]
    pos: Option<File>,
    #[cfg(not(target_os = "wasi"))]
    tx: Option<std::sync::mpsc::SyncSender<Job>>,
    #[cfg(not(target_os = "wasi"))]
    pool: std::sync::mpsc::Receiver<Vec<u8>>,
    #[cfg(not(target_os = "wasi"))]
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    /// Small pieces gathered into one hand-off (many small tensors would otherwise cost a channel send and a
    /// write system call each).
    #[cfg(not(target_os = "wasi"))]
    pending: Vec<u8>,
    #[cfg(target_os = "wasi")]
    file: File,
}

/// Pieces shorter than this are copied into [`FileWriter::pending`] rather than handed off alone.
#[cfg(not(target_os = "wasi"))]
const GATHER_BELOW: usize = 64 << 10;
/// What `pending` holds at most before it is handed off.
#[cfg(not(target_os = "wasi"))]
const GATHER_CAP: usize = 1 << 20;

/// Work for the writer thread.
#[cfg(not(target_os = "wasi"))]
enum Job {
    Data(Vec<u8>),
    /// Bytes written positionally by others: move the cursor past them.
    Skip(u64),
    #[cfg(target_os = "linux")]
    Copy(File, u64, u64),
}

#[cfg(target_os = "linux")]
fn copy_into(dst: &mut File, mut from: File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    from.seek(SeekFrom::Start(offset))?;
    // On Linux, std's io::copy between files is copy_file_range: the bytes never leave the kernel.
    let n = std::io::copy(&mut (&mut from).take(len), dst)?;
    if n != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the source ended after {n} bytes"),
        ));
    }
    Ok(())
}

#[cfg(not(target_os = "wasi"))]
impl FileWriter {
    fn new(mut file: File) -> FileWriter {
        // If the clone fails, positional writes are simply not offered (see DirSink::positional).
        #[cfg(unix)]
        let pos = file.try_clone().ok();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(2);
        let (back, pool) = std::sync::mpsc::channel::<Vec<u8>>();
        let thread = std::thread::spawn(move || -> std::io::Result<()> {
            for job in rx {
                match job {
                    Job::Data(v) => {
                        file.write_all(&v)?;
                        let _ = back.send(v);
                    }
                    Job::Skip(n) => seek_past(&mut file, n)?,
                    #[cfg(target_os = "linux")]
                    Job::Copy(from, offset, len) => copy_into(&mut file, from, offset, len)?,
                }
            }
            Ok(())
        });
        FileWriter {
            tx: Some(tx),
            pool,
            thread: Some(thread),
            pending: Vec::new(),
            #[cfg(unix)]
            pos,
        }
    }

    fn send(&mut self, job: Job) -> std::io::Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(job).is_ok()).unwrap_or(false);
        if sent {
            return Ok(());
        }
        // The writer stopped: its error says why.
        self.tx = None;
        match self.thread.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => Err(e),
            _ => Err(std::io::Error::other("the writer thread stopped")),
        }
    }

    /// Hands the gathered small pieces to the writer thread, if any.
    fn flush_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut v = self.pool.try_recv().unwrap_or_default();
        v.clear();
        std::mem::swap(&mut v, &mut self.pending);
        self.send(Job::Data(v))
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.pending.len() + buf.len() > GATHER_CAP {
            self.flush_pending()?;
        }
        if buf.len() < GATHER_BELOW {
            self.pending.extend_from_slice(buf);
            return Ok(());
        }
        self.flush_pending()?;
        let mut v = self.pool.try_recv().unwrap_or_default();
        v.clear();
        v.extend_from_slice(buf);
        self.send(Job::Data(v))
    }

    /// Hands `buf` itself to the writer thread and leaves a used buffer (or an empty one) in its place; a small
    /// one is gathered instead (and left as it was).
    fn write_owned(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        if buf.len() < GATHER_BELOW {
            return self.write(buf);
        }
        self.flush_pending()?;
        let mut v = self.pool.try_recv().unwrap_or_default();
        std::mem::swap(&mut v, buf);
        self.send(Job::Data(v))
    }

    #[cfg(target_os = "linux")]
    fn copy(&mut self, from: File, offset: u64, len: u64) -> std::io::Result<()> {
        self.flush_pending()?;
        self.send(Job::Copy(from, offset, len))
    }

    fn skip(&mut self, len: u64) -> std::io::Result<()> {
        self.flush_pending()?;
        self.send(Job::Skip(len))
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.flush_pending()?;
        self.tx = None;
        match self.thread.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the writer thread panicked")),
            None => Err(std::io::Error::other("the writer thread stopped")),
        }
    }
}

#[cfg(target_os = "wasi")]
impl FileWriter {
    fn new(file: File) -> FileWriter {
        FileWriter { file }
    }
    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        buf.chunks(IO_CHUNK).try_for_each(|piece| self.file.write_all(piece))
    }
    fn write_owned(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        self.write(buf)
    }
    fn skip(&mut self, len: u64) -> std::io::Result<()> {
        seek_past(&mut self.file, len)
    }
    fn finish(self) -> std::io::Result<()> {
        Ok(())
    }
}
