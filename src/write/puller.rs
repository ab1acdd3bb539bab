//! The one puller: streams every output file of a conversion, segment by segment, one band at a time.
//!
//! An output file is a list of [`Segment`]s whose sizes are known before any byte is read: header or index
//! bytes, safetensors tensor data, a whole torch.save archive (its CRCs computed as the bytes pass), or an input
//! copied through (a base-model file). [`Puller::next_piece`] yields the next [`Piece`]; [`drive`] pushes them into a
//! [`Sink`]. Front ends differ only in where pieces go (a folder on disk, an OPFS handle, a JS stream).

use super::Sink;
use super::torch_save::{TorchSaveLayout, ZipOut, ZipStep};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{Input, Positional};
use crate::plan::{BandBuffers, Plan, fit};

/// One part of an output file, in order.
#[derive(Debug, Clone)]
pub enum Segment {
    /// Bytes known from the plan (a safetensors header, the index, a config file).
    Bytes(Vec<u8>),
    /// The data of a safetensors file: tensors `order` of plan `plan`, back to back.
    Tensors {
        /// Which plan of the output set.
        plan: usize,
        /// Tensor indices in data order.
        order: Vec<usize>,
    },
    /// A whole torch.save archive of plan `plan`.
    TorchSave {
        /// Which plan of the output set.
        plan: usize,
        /// Where every entry goes.
        layout: Box<TorchSaveLayout>,
    },
    /// Input `0` copied whole (a base-model file).
    Input(usize),
}

/// One file of the output, with its exact size and the segments that make it.
#[derive(Debug, Clone)]
pub struct OutputFile {
    /// File name inside the output folder (may hold a subfolder, e.g. `lora_adapter/...`).
    pub name: String,
    /// Exact size in bytes.
    pub size: u64,
    /// What it is made of.
    pub segments: Vec<Segment>,
}

/// What a puller reads: the output files, the plans their segments name, and the inputs every source reads.
pub trait OutputSet {
    /// The files, in writing order.
    fn files(&self) -> &[OutputFile];
    /// Plan `i` (0 is the model's).
    fn plan(&self, i: usize) -> Option<&Plan>;
    /// Every input sources and [`Segment::Input`] refer to, by index.
    fn inputs(&self) -> &[Input];
}

/// The output set of one plan's files (a writer called on its own: tests, tools).
pub struct OnePlan<'a> {
    /// The files, in writing order; their segments name plan 0.
    pub files: Vec<OutputFile>,
    /// The plan.
    pub plan: &'a Plan,
    /// The inputs its sources read.
    pub inputs: &'a [Input],
}

impl OutputSet for OnePlan<'_> {
    fn files(&self) -> &[OutputFile] {
        &self.files
    }
    fn plan(&self, i: usize) -> Option<&Plan> {
        (i == 0).then_some(self.plan)
    }
    fn inputs(&self) -> &[Input] {
        self.inputs
    }
}

/// One step of a streamed output, in file order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A file starts; exactly `size` bytes follow before its `End`.
    Begin {
        /// File name inside the output folder.
        name: &'a str,
        /// Exact size.
        size: u64,
    },
    /// Bytes that are not tensor data (headers, index, zip records, copied files).
    Bytes(&'a [u8]),
    /// Tensor bytes (the puller's band buffer: see [`Puller::band_mut`]).
    Data(&'a [u8]),
    /// The next `len` bytes are bytes `offset..offset + len` of input `input`, unchanged (only when the puller
    /// allows copies).
    Copy {
        /// Input index.
        input: usize,
        /// Byte offset in that input.
        offset: u64,
        /// Length.
        len: u64,
        /// Whether they are tensor bytes (for progress).
        tensor: bool,
    },
    /// Tensor bytes already written at their place through the sink's positional file; the sink moves past them.
    Written(u64),
    /// The current file is complete.
    End,
}

/// Where the puller is inside the current segment.
enum At {
    Start,
    Tensors { k: usize, start: u64 },
    Zip(ZipStep),
    Input { at: u64 },
    Done,
}

/// Produces the bytes of every file of an [`OutputSet`] on demand. It holds only its position and buffers; the
/// set is passed to each call, so it can live beside it.
pub struct Puller {
    allow_copy: bool,
    file: usize,
    begun: bool,
    segment: usize,
    at: At,
    pending: std::collections::VecDeque<(usize, u64, u64, bool)>,
    bufs: BandBuffers,
    band: Vec<u8>,
    scratch: Vec<u8>,
    written: u64,
    direct: Option<Positional>,
    /// The inputs' unread parts were checked ([`Input::check_unread`]).
    checked: bool,
}

/// Verbatim tensor bytes handed out as one copy; it only bounds progress granularity.
const COPY_CHUNK: u64 = 256 << 20;
/// Piece size when a copied input passes through the caller.
const FILE_CHUNK: u64 = 4 << 20;

impl Puller {
    /// A puller at the start of a set; with `allow_copy`, verbatim ranges come as [`Piece::Copy`].
    pub fn new(allow_copy: bool) -> Self {
        Puller {
            allow_copy,
            file: 0,
            begun: false,
            segment: 0,
            at: At::Start,
            pending: Default::default(),
            bufs: BandBuffers::default(),
            band: Vec::new(),
            scratch: Vec::new(),
            written: 0,
            direct: None,
            checked: false,
        }
    }

    /// The buffer the last [`Piece::Data`] came from, for a sink that takes it over ([`Sink::write_owned`]);
    /// whatever is left in its place is resized before the next band is read into it.
    pub fn band_mut(&mut self) -> &mut Vec<u8> {
        &mut self.band
    }

    /// The current file for positional writes (or none): a tensor that several workers compute at once (a LoRA
    /// merge) is then written whole, straight to its place, and comes as [`Piece::Written`].
    pub fn set_direct(&mut self, direct: Option<Positional>) {
        self.direct = direct;
    }

    /// The next piece, or `None` after the last file's `End`. Pass the same set each time.
    pub fn next_piece<'s>(&'s mut self, set: &'s dyn OutputSet) -> Result<Option<Piece<'s>>> {
        loop {
            if let Some((input, offset, len, tensor)) = self.pending.pop_front() {
                self.written += len;
                return Ok(Some(Piece::Copy { input, offset, len, tensor }));
            }
            let Some(file) = set.files().get(self.file) else {
                // Before the caller commits anything: what no read reached is checked now (a deflated storage that
                // views read only in part must still inflate to its declared size and CRC-32).
                if !self.checked {
                    self.checked = true;
                    for input in set.inputs() {
                        input.check_unread()?;
                    }
                }
                return Ok(None);
            };
            if !self.begun {
                self.begun = true;
                (self.segment, self.at, self.written) = (0, At::Start, 0);
                return Ok(Some(Piece::Begin { name: &file.name, size: file.size }));
            }
            let Some(segment) = file.segments.get(self.segment) else {
                if self.written != file.size {
                    return Err(Error::new(ErrorKind::Output(format!(
                        "internal size mismatch for {}: planned {} bytes, wrote {}",
                        file.name, file.size, self.written
                    ))));
                }
                self.file += 1;
                self.begun = false;
                return Ok(Some(Piece::End));
            };
            match self.step(set, segment)? {
                Step::Next => {
                    self.segment += 1;
                    self.at = At::Start;
                }
                Step::Again => {}
                Step::Bytes(from_segment) => {
                    let b: &[u8] = match (from_segment, segment) {
                        (true, Segment::Bytes(b)) => b,
                        _ => &self.scratch,
                    };
                    self.written += b.len() as u64;
                    return Ok(Some(Piece::Bytes(b)));
                }
                Step::Band => {
                    self.written += self.band.len() as u64;
                    return Ok(Some(Piece::Data(&self.band)));
                }
                Step::FileBand => {
                    self.written += self.band.len() as u64;
                    return Ok(Some(Piece::Bytes(&self.band)));
                }
                Step::Written(n) => {
                    self.written += n;
                    return Ok(Some(Piece::Written(n)));
                }
            }
        }
    }

    /// Advances inside `segment`: what to hand out next, if anything.
    fn step(&mut self, set: &dyn OutputSet, segment: &Segment) -> Result<Step> {
        match segment {
            Segment::Bytes(_) => match self.at {
                At::Start => {
                    self.at = At::Done;
                    Ok(Step::Bytes(true))
                }
                _ => Ok(Step::Next),
            },
            Segment::Tensors { plan, order } => self.step_tensors(set.inputs(), plan_of(set, *plan)?, order),
            Segment::TorchSave { plan, layout } => {
                let plan = plan_of(set, *plan)?;
                if let At::Start = self.at {
                    self.at = At::Zip(ZipStep::default());
                }
                let At::Zip(z) = &mut self.at else { return Ok(Step::Next) };
                Ok(match layout.step(z, plan, set.inputs(), &mut self.scratch, &mut self.band, &mut self.bufs)? {
                    ZipOut::Bytes => Step::Bytes(false),
                    ZipOut::Data => Step::Band,
                    ZipOut::Done => Step::Next,
                })
            }
            Segment::Input(i) => self.step_input(set.inputs(), *i),
        }
    }

    /// The next band (or copies, or a positional write) of a safetensors file's tensors.
    fn step_tensors(&mut self, inputs: &[Input], plan: &Plan, order: &[usize]) -> Result<Step> {
        if let At::Start = self.at {
            self.at = At::Tensors { k: 0, start: 0 };
        }
        let At::Tensors { k, start } = &mut self.at else { return Ok(Step::Next) };
        let Some(&i) = order.get(*k) else { return Ok(Step::Next) };
        let t = tensor_of(plan, i)?;
        let n = t.numel();
        if *start >= n {
            t.release(inputs);
            *k += 1;
            *start = 0;
            return Ok(Step::Again);
        }
        let esz = t.dtype.size() as u64;
        if self.allow_copy && copied(t, *start, inputs) {
            let count = copy_step(t).min(n - *start);
            let pieces = t.verbatim_pieces(*start, count).unwrap_or_default();
            self.pending.extend(pieces.into_iter().map(|(i, o, l)| (i, o, l, true)));
            *start += count;
            return Ok(Step::Again);
        }
        if *start == 0
            && let Some(d) = &self.direct
            && t.write_whole(inputs, &positional_blocks(d, self.written), &mut self.bufs)?
        {
            *start = n;
            return Ok(Step::Written(n * esz));
        }
        let count = t.band_elems().min(n - *start);
        fit(&mut self.band, (count * esz) as usize);
        t.read_band(inputs, *start, count, &mut self.band, &mut self.bufs)?;
        *start += count;
        Ok(Step::Band)
    }

    /// The next piece of input `i` copied whole: one copy when allowed, else 4 MiB reads.
    fn step_input(&mut self, inputs: &[Input], i: usize) -> Result<Step> {
        let input = inputs.get(i).ok_or_else(|| missing_input(i))?;
        if let At::Start = self.at {
            self.at = At::Input { at: 0 };
        }
        let At::Input { at } = &mut self.at else { return Ok(Step::Next) };
        let len = input.len();
        if *at >= len {
            return Ok(Step::Next);
        }
        if self.allow_copy {
            self.pending.push_back((i, 0, len, false));
            *at = len;
            return Ok(Step::Again);
        }
        let n = (len - *at).min(FILE_CHUNK);
        fit(&mut self.band, n as usize);
        input.read_exact_at(*at, &mut self.band)?;
        *at += n;
        Ok(Step::FileBand)
    }
}

/// What [`Puller::step`] found.
enum Step {
    /// The segment is done.
    Next,
    /// Look again (state moved, or copies were queued).
    Again,
    /// Hand out bytes: the segment's own (`true`) or the scratch buffer's.
    Bytes(bool),
    /// Hand out the band buffer as tensor data.
    Band,
    /// Hand out the band buffer as file bytes.
    FileBand,
    /// A tensor of this many bytes went straight to its place.
    Written(u64),
}

fn plan_of(set: &dyn OutputSet, i: usize) -> Result<&Plan> {
    set.plan(i).ok_or_else(|| Error::new(ErrorKind::Output(format!("internal: no plan {i}"))))
}

/// Whether the bytes of tensor `t` from element `start` go out as verbatim copies of an input's stored bytes.
fn copied(t: &crate::plan::PlannedTensor, start: u64, inputs: &[Input]) -> bool {
    t.verbatim_pieces(start, 0).is_some() && t.reads_stored_bytes(inputs)
}

/// Elements per copy a copied tensor is handed out in: whole band units, so a tensor never mixes copies and bands
/// mid-way.
fn copy_step(t: &crate::plan::PlannedTensor) -> u64 {
    (COPY_CHUNK / t.dtype.size() as u64 / t.band_elems()).max(1) * t.band_elems()
}

fn tensor_of(plan: &Plan, i: usize) -> Result<&crate::plan::PlannedTensor> {
    plan.tensors.get(i).ok_or_else(|| Error::new(ErrorKind::Output(format!("internal: no tensor {i}"))))
}

fn missing_input(i: usize) -> Error {
    Error::new(ErrorKind::Output(format!("plan refers to missing input {i}")))
}

/// Hands a tensor's blocks to the sink's positional file, the tensor starting at byte `base` of it.
fn positional_blocks(target: &Positional, base: u64) -> impl Fn(u64, &[u8]) -> Result<()> + Sync + '_ {
    move |offset, buf| {
        let at = base + offset;
        target
            .file
            .write_all_at(at, buf)
            .map_err(|e| Error::new(ErrorKind::Output(format!("writing at byte {at}: {e}"))).in_file(&target.name))
    }
}

/// Piece size when verbatim bytes pass through the caller (no in-kernel copy: WASI, or a sink without one): small
/// enough to stay in the CPU's cache between the read and the write.
const COPY_BUF: u64 = 256 << 10;

/// Streams every file of `set` into `sink` (the caller commits once every output file is written). Verbatim
/// ranges go to the sink's own copy when it has one. `progress` gets the tensor bytes written so far.
pub fn drive(set: &dyn OutputSet, sink: &mut dyn Sink, progress: &mut dyn FnMut(u64)) -> Result<()> {
    let mut puller = Puller::new(true);
    let mut done = 0u64;
    while let Some(piece) = puller.next_piece(set)? {
        match piece {
            Piece::Begin { name, size } => {
                sink.begin(name, size)?;
                let direct = sink.positional();
                puller.set_direct(direct);
            }
            Piece::Bytes(b) => sink.write(b)?,
            Piece::Data(b) => {
                done += b.len() as u64;
                sink.write_owned(puller.band_mut())?;
                progress(done);
            }
            Piece::Copy { input, offset, len, tensor } => {
                let src = set.inputs().get(input).ok_or_else(|| missing_input(input))?;
                if !sink.copy_range(src, offset, len)? {
                    // Through the band buffer, so a sink that takes buffers over sees one kind of buffer (never
                    // more than the few a band-sized writer queue holds).
                    let mut at = 0;
                    while at < len {
                        let n = (len - at).min(COPY_BUF);
                        let buf = puller.band_mut();
                        fit(buf, n as usize);
                        src.read_exact_at(offset + at, buf)?;
                        sink.write_owned(buf)?;
                        at += n;
                    }
                }
                if tensor {
                    done += len;
                    progress(done);
                }
            }
            Piece::Written(len) => {
                sink.skip(len)?;
                done += len;
                progress(done);
            }
            Piece::End => {
                puller.set_direct(None);
                sink.end()?
            }
        }
    }
    Ok(())
}
