//! `--jobs J`: up to J output files written at once, and `--plan-parts N`: the split into parts, as JSON.
//!
//! Each job thread plans the same conversion again for itself: a plan's readers keep positions and caches, so one
//! plan is read by one thread. Planning reads metadata only; the files split by bytes ([`parts::split`]).

use crate::fsio::DirSink;
use ckptconv::conversion::Conversion;
use ckptconv::io::{Input, Positional};
use ckptconv::write::parts;
use ckptconv::write::{OutputSet, Sink};
use ckptconv::{Error, ErrorKind, Result};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Plans the conversion again (for a job on its own thread).
pub type Build<'a> = dyn Fn() -> Result<Conversion> + Sync + 'a;

/// `--plan-parts N`: each part's data files with their sizes, and the files the finishing step writes.
pub fn parts_json(conv: &Conversion, n: usize) -> serde_json::Value {
    let files = conv.files();
    let entry = |i: &usize| serde_json::json!({"name": files[*i].name, "size": files[*i].size});
    let groups: Vec<serde_json::Value> = parts::split(files, &parts::data_files(files), n)
        .iter()
        .enumerate()
        .map(|(k, g)| {
            let bytes: u64 = g.iter().map(|&i| files[i].size).sum();
            serde_json::json!({"part": k + 1, "bytes": bytes, "files": g.iter().map(entry).collect::<Vec<_>>()})
        })
        .collect();
    let finishing: Vec<serde_json::Value> = parts::finishing(files).iter().map(entry).collect();
    serde_json::json!({"parts": n, "groups": groups, "finishing": finishing})
}

/// Writes files `which` of `conv` into `out_dir`, up to `jobs` data files at once; `sink` is the first job's and
/// also takes the files without tensor bytes. Returns every job's sink with its files staged, to be committed in
/// order (the first job's last). On an error, the other jobs stop at their next write and nothing is kept.
#[allow(clippy::too_many_arguments)]
pub fn write(
    conv: &Conversion,
    build: &Build,
    which: &[usize],
    out_dir: &Path,
    force: bool,
    jobs: usize,
    mut sink: DirSink,
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<DirSink>> {
    let files = conv.files();
    let data: Vec<usize> = which.iter().copied().filter(|&i| parts::is_data(&files[i])).collect();
    let mut groups = parts::split(files, &data, jobs.min(data.len()).max(1));
    groups.retain(|g| !g.is_empty());
    if groups.len() <= 1 {
        conv.write_files(which, &mut sink, progress)?;
        return Ok(vec![sink]);
    }
    if cfg!(target_os = "wasi") {
        return Err(Error::new(ErrorKind::Unsupported(
            "--jobs above 1 needs threads, which the WASI build does not have".into(),
        )));
    }
    groups[0].extend(which.iter().copied().filter(|&i| !parts::is_data(&files[i])));
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let done: Vec<AtomicU64> = groups.iter().map(|_| AtomicU64::new(0)).collect();
    let total = || done.iter().map(|d| d.load(Ordering::Relaxed)).sum::<u64>();
    // The first error wins and stops the rest; what the stopped jobs then report is not the cause.
    let fail = |e: Error| {
        if let Ok(mut f) = failure.lock()
            && f.is_none()
        {
            *f = Some(e);
        }
        stop.store(true, Ordering::SeqCst);
    };
    let sinks = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .enumerate()
            .skip(1)
            .map(|(j, g)| {
                let (done, stop, fail) = (&done[j], &stop, &fail);
                s.spawn(move || {
                    let run = || -> Result<DirSink> {
                        let conv = build()?;
                        let mut sink = DirSink::new(out_dir, force)?;
                        conv.write_files(g, &mut Stopping { sink: &mut sink, stop }, &mut |d| {
                            done.store(d, Ordering::Relaxed)
                        })?;
                        Ok(sink)
                    };
                    run().map_err(fail).ok()
                })
            })
            .collect();
        let first = conv.write_files(&groups[0], &mut Stopping { sink: &mut sink, stop: &stop }, &mut |d| {
            done[0].store(d, Ordering::Relaxed);
            progress(total());
        });
        if let Err(e) = first {
            fail(e);
        }
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(std::time::Duration::from_millis(50));
            progress(total());
        }
        handles.into_iter().map(|h| h.join().ok().flatten()).collect::<Vec<_>>()
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    let mut out: Vec<DirSink> = sinks.into_iter().map(|s| s.ok_or_else(stopped)).collect::<Result<_>>()?;
    out.push(sink);
    Ok(out)
}

fn stopped() -> Error {
    Error::new(ErrorKind::Output("a writing job stopped without saying why".into()))
}

/// A job's sink, which refuses to go on once another job has failed.
struct Stopping<'a> {
    sink: &'a mut DirSink,
    stop: &'a AtomicBool,
}

impl Stopping<'_> {
    fn check(&self) -> Result<()> {
        match self.stop.load(Ordering::Relaxed) {
            true => Err(Error::new(ErrorKind::Output("stopped: another writing job failed".into()))),
            false => Ok(()),
        }
    }
}

impl Sink for Stopping<'_> {
    fn begin(&mut self, name: &str, size: u64) -> Result<()> {
        self.check()?;
        self.sink.begin(name, size)
    }
    fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.check()?;
        self.sink.write(buf)
    }
    fn write_owned(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        self.check()?;
        self.sink.write_owned(buf)
    }
    fn positional(&mut self) -> Option<Positional> {
        self.sink.positional()
    }
    fn skip(&mut self, len: u64) -> Result<()> {
        self.check()?;
        self.sink.skip(len)
    }
    fn end(&mut self) -> Result<()> {
        self.sink.end()
    }
    fn commit(&mut self) -> Result<()> {
        self.sink.commit()
    }
    fn copy_range(&mut self, input: &Input, offset: u64, len: u64) -> Result<bool> {
        self.check()?;
        self.sink.copy_range(input, offset, len)
    }
}
