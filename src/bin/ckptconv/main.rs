//! The `ckptconv` command line (native and wasm32-wasip1 from the same source).
//!
//! Exit codes: 0 success, 1 a clear error on stderr, 2 a usage error.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

/// A line on standard error. Unlike `eprintln!`, a closed stderr (`2>&1 | head -1`) is not a panic: the run goes
/// on and its exit code still says how it ended. The line is one line: names from a file in it are escaped
/// (`display_safe`), so a control character in one can neither end it nor rewrite what the terminal shows.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!($($arg)*);
        let _ = writeln!(std::io::stderr(), "{}", ckptconv::display_safe(&line));
    }};
}

mod fsio;
mod hosturl;
mod jobs;
mod progress;

use ckptconv::conversion::{Checkpoint, Conversion, ConversionOptions, Output};
use ckptconv::dtype::DType;
use ckptconv::hf::BaseModel;
use ckptconv::io::{Folder, Input, Trusting};
use ckptconv::lora::{LoraMode, LoraOptions};
use ckptconv::planned::{InputKind, PlanOptions};
use ckptconv::select::Prefix;
use ckptconv::write::parts::{self, Part};
use ckptconv::write::{OutputSet, Sink, safetensors};
use ckptconv::{Error, ErrorKind, display_safe};
use ckptconv::{rlinf, verify};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ckptconv",
    version,
    about = "Training checkpoints to Hugging Face safetensors: no Python, no torch, bounded memory."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the detected format, the checkpoint's groups and the planned output tensors.
    Inspect {
        /// A torch.save file, a DCP folder, or a global_step_N / actor folder.
        input: PathBuf,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Convert a checkpoint to safetensors (or a torch.save file) in OUT_DIR.
    Convert {
        /// A torch.save file, a DCP folder, or a global_step_N / actor folder.
        input: PathBuf,
        /// Output folder (created if missing).
        out_dir: PathBuf,
        #[command(flatten)]
        plan: PlanArgs,
        /// Split into shards of at most this size (e.g. 5GB, 500MB, 2GiB) plus an index.
        #[arg(long, value_parser = parse_size)]
        max_shard_size: Option<u64>,
        /// Output format: safetensors (model.safetensors) or pt (pytorch_model.bin, a torch.save file).
        #[arg(long, value_enum, default_value = "safetensors")]
        format: OutFormat,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Merge a Megatron checkpoint (any TP x PP) into a Hugging Face folder, like RLinf's mg2hf_*.sh.
    Mg2hf {
        /// The Megatron checkpoint: an actor/ folder, an iter_XXXXXXX folder or a global_step_N folder.
        megatron_ckpt: PathBuf,
        /// The Hugging Face folder to write.
        hf_out: PathBuf,
        /// The base Hugging Face model the checkpoint was trained from (config, tokenizer).
        base_hf: PathBuf,
        #[command(flatten)]
        plan: PlanArgs,
        /// Split into shards of at most this size plus an index.
        #[arg(long, value_parser = parse_size, default_value = "5GB")]
        max_shard_size: u64,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Re-read an output folder and check it: headers, offsets, sizes and index; with --against, every tensor's
    /// bytes against the input (give the same flags as the conversion).
    Verify {
        /// The folder `convert` wrote.
        out_dir: PathBuf,
        /// The input it was converted from.
        #[arg(long)]
        against: Option<PathBuf>,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Report what a pickle-based file (.pt, .bin, .pth) would run, without running anything: every global its
    /// pickles name, classed by ckptconv's allowlist, whether torch.load(weights_only=True) would accept them,
    /// whether ckptconv converts it, and its tensors. Exit 0 when nothing off the allowlist is named, 1 when
    /// something is (or the file cannot be read), 2 on usage errors.
    Scan {
        /// The file.
        input: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert as RLinf's convert_pt_to_hf.py does, driven by its fsdp_model_convertor.yaml.
    Pt2hf {
        /// The YAML config (convertor.ckpt_path, convertor.save_path, model.model_path, model.is_lora, ...).
        #[arg(long)]
        config: PathBuf,
        /// Flags given here override the file.
        #[command(flatten)]
        plan: PlanArgs,
        /// Split into shards of at most this size plus an index.
        #[arg(long, value_parser = parse_size, default_value = "4GiB")]
        max_shard_size: u64,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Write the model state dict of a DCP folder as one torch.save file (like RLinf's convert_dcp_to_pt.py).
    #[command(name = "dcp-to-pt")]
    DcpToPt {
        /// The DCP folder (holding .metadata and .distcp files), or a global_step_N / actor folder.
        #[arg(long = "dcp_path", alias = "dcp-path")]
        dcp_path: PathBuf,
        /// The .pt file to write.
        #[arg(long = "output_path", alias = "output-path")]
        output_path: PathBuf,
        #[command(flatten)]
        plan: PlanArgs,
        #[command(flatten)]
        out: OutArgs,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OutFormat {
    Safetensors,
    Pt,
}

#[derive(clap::Args)]
struct OutArgs {
    /// Overwrite output files that already exist.
    #[arg(long)]
    force: bool,
    /// After writing, re-derive every tensor from the input and compare (default: a structural check).
    #[arg(long)]
    verify: bool,
    /// Never show a progress bar.
    #[arg(long)]
    quiet: bool,
    /// Write only part I of N (I from 1): the output's data files (shards) split into N groups of about equal bytes,
    /// decided by the plan alone, so every machine agrees. Run every part, in any order, anywhere, then --finish.
    #[arg(long, value_name = "I/N", conflicts_with_all = ["finish", "plan_parts"])]
    part: Option<Part>,
    /// After every --part has run: check each data file is there with its exact size, then write the index,
    /// config and base-model files, so the folder looks finished only when it is.
    #[arg(long, conflicts_with = "plan_parts")]
    finish: bool,
    /// Print how the output splits into N parts (JSON: each part's files and bytes, the finishing files) and
    /// write nothing.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    plan_parts: Option<usize>,
    /// Write up to J output files at once (threads of this process), for disks that take parallel writes.
    #[arg(long, value_name = "J", default_value = "1", value_parser = parse_count)]
    jobs: usize,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Output dtype for float tensors: keep, bf16, fp16 or fp32.
    #[arg(long, default_value = "keep", value_parser = parse_dtype)]
    dtype: CastTo,
    /// Take only tensors under this dotted prefix and strip it ('' keeps every tensor). Default: strip a
    /// wrapping fsdp_checkpoint.model/state_dict/model/module/model_state_dict key when present.
    #[arg(long)]
    prefix: Option<String>,
    /// The base Hugging Face model folder: its config and tokenizer files are copied into the output
    /// (never its weights); Megatron checkpoints need it for names, vocabulary and dtype.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Write even when names or shapes differ from the base model's weights.
    #[arg(long)]
    allow_mismatch: bool,
    /// PEFT LoRA tensors: merge them into the weights (default) or export a PEFT adapter.
    #[arg(long, value_enum)]
    lora: Option<LoraArg>,
    /// LoRA alpha (default: adapter_config.json, else alpha = r as RLinf does).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// LoRA rank r (default: adapter_config.json, else the lora_A shapes).
    #[arg(long)]
    lora_r: Option<u64>,
    /// A folder holding the LoRA's adapter_config.json.
    #[arg(long)]
    lora_path: Option<PathBuf>,
    /// Model type for per-model save helpers (e.g. openvla_oft).
    #[arg(long)]
    model_type: Option<String>,
    /// openvla_oft: also write vision_backbone--0_checkpoint.pt.
    #[arg(long)]
    use_film: bool,
    /// openvla_oft: also write proprio_projector--0_checkpoint.pt.
    #[arg(long)]
    use_proprio: bool,
    /// Allow the checkpoint's pickles to call this global too (repeatable), like torch's add_safe_globals: for
    /// a file you trust that needs a class off ckptconv's allowlist. ckptconv still calls nothing.
    #[arg(long = "allow-global", value_name = "MODULE.NAME", value_parser = parse_global)]
    allow_global: Vec<String>,
    /// Convert one shard of a sharded Hugging Face set alone (normally its siblings are required).
    #[arg(long)]
    allow_partial: bool,
    /// Set by mg2hf: anything but a Megatron checkpoint is an error.
    #[arg(skip)]
    megatron_only: bool,
    /// Where --lora-r came from when pt2hf took it from the config.
    #[arg(skip)]
    lora_r_origin: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LoraArg {
    Merge,
    Adapter,
}

/// The parsed `--dtype` (a newtype, since clap reads a bare `Option` field as "flag may be absent").
#[derive(Clone, Copy)]
struct CastTo(Option<DType>);

fn parse_dtype(s: &str) -> Result<CastTo, String> {
    DType::from_cli(s).map(CastTo)
}

fn parse_global(s: &str) -> Result<String, String> {
    ckptconv::pickle::policy::parse_allowed(s)
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=parts::MAX_PARTS).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a number from 1 to {}", parts::MAX_PARTS)),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    safetensors::parse_size(s)
}

impl PlanArgs {
    fn options(&self) -> PlanOptions {
        PlanOptions {
            require_base: true,
            allow_mismatch: self.allow_mismatch,
            allow_globals: self.allow_global.clone().into(),
            allow_partial: self.allow_partial,
            lora: LoraOptions::default(),
            dtype: self.dtype.0,
            prefix: match &self.prefix {
                Some(p) => Prefix::Explicit(p.clone()),
                None => Prefix::Auto,
            },
        }
    }
}

impl PlanArgs {
    /// The conversion these flags ask for, writing `output`; reads the LoRA's adapter_config.json (from
    /// `--lora-path` or the base folder) when there is one.
    fn conversion(&self, output: Output) -> ckptconv::Result<ConversionOptions> {
        let flags = [("use_film", self.use_film), ("use_proprio", self.use_proprio)];
        Ok(ConversionOptions {
            plan: PlanOptions { lora: lora_options(self)?, ..self.options() },
            output,
            expect: self.megatron_only.then_some(InputKind::Megatron),
            as_saved: false,
            model_type: self
                .model_type
                .clone()
                .map(|mt| (mt, flags.iter().filter(|(_, on)| *on).map(|(f, _)| f.to_string()).collect())),
        })
    }
}

/// Runs `f` with the base model of `--base`, if one was given.
fn with_base<T>(args: &PlanArgs, f: impl FnOnce(Option<&BaseModel>) -> ckptconv::Result<T>) -> ckptconv::Result<T> {
    match args.base.as_deref() {
        None => f(None),
        Some(p) => {
            if !p.is_dir() {
                let what = if p.exists() { "is not a folder" } else { "does not exist" };
                return Err(Error::new(ErrorKind::Config(format!("the base model folder {what}")))
                    .in_file(&p.display().to_string()));
            }
            let disk = fsio::DiskFolder::open(p)?;
            // The base's pickled weights (a pytorch_model.bin) may call what the checkpoint's may.
            let folder = Trusting { folder: &disk, allowed: args.options().allow_globals };
            let base = BaseModel::open(&folder)?;
            f(Some(&base))
        }
    }
}

/// Runs `f` on the checkpoint at `path`: a folder, or a file. One Megatron rank (a model_optim_rng.pt, or its
/// mp_rank_* folder) is only part of the model, so it stands for the whole iteration folder it belongs to.
fn with_checkpoint<T>(path: &Path, f: impl FnOnce(Checkpoint) -> ckptconv::Result<T>) -> ckptconv::Result<T> {
    open_checkpoint(path, true, f)
}

/// [`with_checkpoint`], saying what a Megatron rank stands for only when `announce` (a job planning again is quiet).
fn open_checkpoint<T>(
    path: &Path,
    announce: bool,
    f: impl FnOnce(Checkpoint) -> ckptconv::Result<T>,
) -> ckptconv::Result<T> {
    let shown = path.display().to_string();
    if hosturl::is_url(path) {
        return f(Checkpoint::File(hosturl::open(&shown)?));
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::new(ErrorKind::Io(fsio::io_text(&e))).in_file(&shown))?;
    let rank_dir = if meta.is_dir() { Some(path) } else { path.parent() };
    let is_rank_dir = rank_dir.and_then(Path::file_name).is_some_and(|n| n.to_string_lossy().starts_with("mp_rank_"));
    let is_rank_file = meta.is_file() && path.file_name().is_some_and(|n| n == "model_optim_rng.pt");
    if is_rank_dir
        && (meta.is_dir() || is_rank_file)
        && let Some(iter_dir) = rank_dir.and_then(Path::parent)
    {
        if announce {
            say!("ckptconv: {shown} is one Megatron rank; reading every rank in {}", iter_dir.display());
        }
        let folder = fsio::DiskFolder::open(iter_dir)?;
        return f(Checkpoint::Folder(&folder));
    }
    if meta.is_dir() {
        let folder = fsio::DiskFolder::open(path)?;
        return f(Checkpoint::Folder(&folder));
    }
    // An index or one shard of a Hugging Face set stands for the whole set, and transformers' weights files come
    // with their folder's config: the core reads them with their siblings.
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    if ckptconv::hfset::stands_for_set(&name)
        && let Some(dir) = path.parent()
    {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let folder = fsio::DiskFolder::open_flat(dir)?;
        f(Checkpoint::Member(&folder, name))
    } else {
        let data = fsio::FileInput::open(path)?;
        f(Checkpoint::File(Input::new(shown, Box::new(data))))
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.2} {}", UNITS[u]) }
}

fn inspect(input: &Path, json: bool, args: &PlanArgs) -> ckptconv::Result<()> {
    use std::fmt::Write as _;
    let opts = ConversionOptions { plan: PlanOptions { require_base: false, ..args.options() }, ..Default::default() };
    // The plan as `convert` would write it (after the FP8 dequant, the LoRA merge, the tied copies dropped). When
    // that fails, the checkpoint is read again: a reading error is the error; a finishing step's refusal is shown
    // as a note over the plan as read, so a broken checkpoint can still be inspected.
    let finished = with_base(args, |base| with_checkpoint(input, |c| Conversion::new(c, base, &opts)));
    let (mut own, conv);
    let planned: &ckptconv::planned::Planned = match finished {
        Ok(c) => {
            conv = c;
            conv.planned()
        }
        Err(e) => {
            own = with_base(args, |base| with_checkpoint(input, |c| ckptconv::conversion::plan(c, base, &opts)))?;
            own.plan.notes.push(format!("convert would stop here: error[{}]: {e}", e.label()));
            &own
        }
    };
    let plan = &planned.plan;
    if json {
        let mut doc = planned.json_fields();
        doc.insert("input".into(), input.display().to_string().into());
        doc.insert("total_bytes".into(), plan.total_bytes().into());
        let doc = serde_json::Value::Object(doc);
        // Exact names; JSON escapes C0 controls itself, json_safe the rest that a terminal would act on.
        return print_out(&ckptconv::error::json_safe(&format!("{doc:#}\n")));
    }
    // Writing into a String cannot fail; the text goes out in one piece (see print_out). Every string from the
    // file is escaped on its own, so a newline in a name cannot start a line of its own.
    let mut s = String::new();
    let _ = writeln!(s, "input:   {}", display_safe(&input.display().to_string()));
    let _ = writeln!(s, "format:  {}", display_safe(&planned.format));
    for n in &plan.notes {
        let _ = writeln!(s, "note:    {}", display_safe(n));
    }
    let _ = writeln!(s, "groups:");
    for g in &planned.groups {
        let others = if g.others > 0 { format!(", {} non-tensor item(s)", g.others) } else { String::new() };
        let name = display_safe(&g.name);
        let _ = writeln!(s, "  {name:<40} {:>7} tensor(s) {:>12}{others}", g.tensors, human(g.bytes));
    }
    let _ = writeln!(s, "tensors: {} ({} in {})\n", plan.tensors.len(), human(plan.total_bytes()), plan.total_bytes());
    let names: Vec<_> = plan.tensors.iter().map(|t| display_safe(&t.name)).collect();
    let w = names.iter().map(|n| n.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(s, "{:<w$}  {:<7}  {:<20}  {:>14}", "name", "dtype", "shape", "bytes");
    for (t, name) in plan.tensors.iter().zip(&names) {
        let shape = format!("{:?}", t.shape);
        let _ = writeln!(s, "{name:<w$}  {:<7}  {:<20}  {:>14}", t.dtype.safetensors_name(), shape, t.nbytes());
    }
    print_out(&s)
}

/// Writes a command's report to standard output. A reader that stops early (`ckptconv inspect X | head`) closes
/// the pipe: that ends the report quietly, as it does for other Unix tools, instead of being an error.
fn print_out(text: &str) -> ckptconv::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(ckptconv::Error::new(ckptconv::ErrorKind::Io(
            format!("writing to standard output: {}", fsio::io_text(&e)),
        ))),
        _ => Ok(()),
    }
}

fn convert(
    input: &Path,
    out_dir: &Path,
    args: &PlanArgs,
    max_shard: Option<u64>,
    format: OutFormat,
    out: &OutArgs,
) -> ckptconv::Result<()> {
    let output = match format {
        OutFormat::Safetensors => Output::Safetensors { max_shard },
        OutFormat::Pt if max_shard.is_some() => {
            return Err(Error::new(ErrorKind::Unsupported(
                "--format pt writes one merged pytorch_model.bin (no shards, no adapter)".into(),
            )));
        }
        OutFormat::Pt => Output::TorchSave { name: "pytorch_model.bin".into() },
    };
    let opts = args.conversion(output)?;
    // What a job on another thread plans for itself (a plan's inputs are read by one thread).
    let build = || with_base(args, |base| open_checkpoint(input, false, |c| Conversion::new(c, base, &opts)));
    with_base(args, |base| {
        let conv = with_checkpoint(input, |c| Conversion::new(c, base, &opts))?;
        let complete = write_out(&conv, &build, out_dir, out, input)?;
        if complete && format == OutFormat::Safetensors {
            let folder = fsio::DiskFolder::open(out_dir)?;
            let sub = if conv.is_adapter() { safetensors::ADAPTER_DIR } else { "" };
            let planned = conv.planned();
            let r = if out.verify {
                verify::against(&folder, sub, &planned.plan, &planned.inputs)?
            } else {
                verify::structural(&folder, sub)?
            };
            say!("ckptconv: verified {}", describe(&r));
        }
        Ok(())
    })
}

/// Writes what `out` asks of `conv` into `out_dir`, with a progress bar: every output file (temp names, renamed
/// together at the end), one part's data files, or the finishing step; or prints the split into parts. `build`
/// plans the same conversion again, for `--jobs` threads. Returns whether the folder is now complete.
fn write_out(
    conv: &Conversion,
    build: &jobs::Build,
    out_dir: &Path,
    out: &OutArgs,
    input: &Path,
) -> ckptconv::Result<bool> {
    let files = conv.files();
    if let Some(n) = out.plan_parts {
        return print_out(&format!("{:#}\n", jobs::parts_json(conv, n))).map(|()| false);
    }
    let (which, part) = match out.part {
        Some(p) => (parts::part_files(files, p), Some(format!("part {}/{}", p.index, p.count))),
        None if out.finish => (parts::finishing(files), None),
        None => ((0..files.len()).collect(), None),
    };
    let names: Vec<String> = which.iter().map(|&i| files[i].name.clone()).collect();
    let sink = fsio::DirSink::new(out_dir, out.force)?;
    sink.check_free(&names)?;
    if part.is_some() {
        // A part into a folder that holds a finished conversion would make it look finished while it changes (and
        // after a failed part, an earlier index would sit beside new shards): refused, or with --force removed.
        let finishing: Vec<String> = parts::finishing(files).iter().map(|&i| files[i].name.clone()).collect();
        sink.check_free(&finishing)?;
        let there: Vec<&String> = finishing.iter().filter(|n| out_dir.join(n).is_file()).collect();
        for n in &there {
            let p = out_dir.join(n);
            std::fs::remove_file(&p).map_err(|e| {
                Error::new(ErrorKind::Output(format!("cannot remove an earlier finishing file: {}", fsio::io_text(&e))))
                    .in_file(&p.display().to_string())
            })?;
        }
        if !there.is_empty() {
            let names: Vec<&str> = there.iter().map(|n| n.as_str()).collect();
            say!(
                "ckptconv: removed what an earlier conversion finished with ({}): --finish writes it",
                names.join(", ")
            );
        }
    }
    if out.finish {
        let size_of = |name: &str| std::fs::metadata(out_dir.join(name)).ok().filter(|m| m.is_file()).map(|m| m.len());
        let missing = parts::missing(files, &size_of);
        if !missing.is_empty() {
            let data = parts::data_files(files).len();
            return Err(parts::missing_error(&missing, data).in_file(&out_dir.display().to_string()));
        }
    }
    let planned = conv.planned();
    say!("ckptconv: {} is {}", input.display(), planned.format);
    for n in &planned.plan.notes {
        say!("ckptconv: {n}");
    }
    if let (Some(p), true) = (&part, which.is_empty()) {
        let data = parts::data_files(files).len();
        say!("ckptconv: {p} has nothing to write: the output has {data} data file(s)");
        return Ok(false);
    }
    let bytes = parts::Subset::new(conv, &which).tensor_bytes();
    let mut bar = progress::Progress::new(bytes, !out.quiet);
    let sinks = jobs::write(conv, build, &which, out_dir, out.force, out.jobs, sink, &mut |d| bar.update(d))?;
    bar.finish();
    for mut s in sinks {
        s.commit()?;
    }
    let what = match &part {
        Some(p) => format!("{p}: {} data file(s) ({})", names.len(), human(bytes)),
        None if out.finish => "the finishing files".into(),
        None => format!("{} tensors ({})", planned.plan.tensors.len(), human(planned.plan.total_bytes())),
    };
    say!("ckptconv: wrote {what} to {}: {}", out_dir.display(), names.join(", "));
    Ok(part.is_none())
}

fn describe(r: &verify::VerifyReport) -> String {
    let what = if r.compared > 0 {
        format!(", every byte compared with the input ({})", human(r.compared))
    } else {
        String::new()
    };
    format!("{} file(s), {} tensors, {}{what}", r.files, r.tensors, human(r.bytes))
}

fn verify_cmd(out_dir: &Path, against: Option<&Path>, args: &PlanArgs) -> ckptconv::Result<()> {
    let folder = fsio::DiskFolder::open(out_dir)?;
    let sub =
        if folder.files().iter().any(|f| f == safetensors::ADAPTER_MODEL) { safetensors::ADAPTER_DIR } else { "" };
    let r = match against {
        None => verify::structural(&folder, sub)?,
        Some(input) => with_base(args, |base| {
            let opts = args.conversion(Output::Safetensors { max_shard: None })?;
            let conv = with_checkpoint(input, |c| Conversion::new(c, base, &opts))?;
            verify::against(&folder, sub, conv.plan(), &conv.planned().inputs)
        })?,
    };
    print_out(&format!("ok: {}\n", describe(&r)))
}

/// The LoRA settings of the command line, with an adapter_config.json from `--lora-path` or the base folder.
fn lora_options(args: &PlanArgs) -> ckptconv::Result<LoraOptions> {
    let mut adapter_config = None;
    if let Some(dir) = &args.lora_path
        && !dir.join("adapter_config.json").is_file()
    {
        return Err(Error::new(ErrorKind::Config("the LoRA path holds no adapter_config.json".into()))
            .in_file(&dir.display().to_string()));
    }
    for dir in args.lora_path.iter().chain(args.base.iter()) {
        let f = dir.join("adapter_config.json");
        if f.is_file() {
            let shown = f.display().to_string();
            let input = Input::new(shown, Box::new(fsio::FileInput::open(&f)?));
            adapter_config = Some(ckptconv::lora::read_adapter_config(&input)?);
            break;
        }
    }
    Ok(LoraOptions {
        mode: match args.lora {
            Some(LoraArg::Adapter) => LoraMode::Adapter,
            _ => LoraMode::Merge,
        },
        explicit: args.lora.is_some(),
        alpha: args.lora_alpha,
        r: args.lora_r,
        r_origin: args.lora_r_origin.clone(),
        adapter_config,
    })
}

fn dcp_to_pt(dcp_path: &Path, output_path: &Path, args: &PlanArgs, out: &OutArgs) -> ckptconv::Result<()> {
    let shown = output_path.display().to_string();
    let name = output_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::new(ErrorKind::Output("the output path names no file".into())).in_file(&shown))?;
    let dir = match output_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dcp_path.is_dir() {
        return Err(
            Error::new(ErrorKind::NotCheckpoint("is not a folder".into())).in_file(&dcp_path.display().to_string())
        );
    }
    let opts = ConversionOptions {
        plan: args.options(),
        output: Output::TorchSave { name },
        as_saved: true,
        ..Default::default()
    };
    let conv = with_checkpoint(dcp_path, |c| Conversion::new(c, None, &opts))?;
    let build = || open_checkpoint(dcp_path, false, |c| Conversion::new(c, None, &opts));
    write_out(&conv, &build, &dir, out, dcp_path).map(|_| ())
}

/// Runs RLinf's convert_pt_to_hf.py job from its YAML config; flags given on the command line win.
fn pt2hf(config: &Path, mut args: PlanArgs, max_shard: u64, out: &OutArgs) -> ckptconv::Result<()> {
    let shown = config.display().to_string();
    let text =
        std::fs::read_to_string(config).map_err(|e| Error::new(ErrorKind::Io(fsio::io_text(&e))).in_file(&shown))?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    let cfg = rlinf::parse(&text, &|rel| std::fs::read_to_string(dir.join(rel)).ok()).map_err(|e| e.in_file(&shown))?;
    for n in &cfg.notes {
        say!("ckptconv: {shown}: {n}");
    }
    let need = |v: &Option<String>, key: &str| {
        v.clone().ok_or_else(|| Error::new(ErrorKind::Config(format!("{key} is missing"))).in_file(&shown))
    };
    let ckpt = PathBuf::from(need(&cfg.ckpt_path, "convertor.ckpt_path")?);
    let save = PathBuf::from(need(&cfg.save_path, "convertor.save_path")?);
    if args.base.is_none() {
        args.base = Some(PathBuf::from(need(&cfg.model_path, "model.model_path")?));
    }
    if args.lora.is_none() && cfg.is_lora == Some(true) {
        args.lora = Some(if cfg.merge_lora.unwrap_or(true) { LoraArg::Merge } else { LoraArg::Adapter });
    }
    // As RLinf's model builder: a lora_path adapter (PeftModel.from_pretrained) decides r and alpha; only
    // without one is the LoRA built from model.lora_rank (with alpha = r).
    if args.lora_path.is_none() {
        args.lora_path = cfg.lora_path.map(PathBuf::from);
    }
    if args.lora_path.is_none() && args.lora_r.is_none() && cfg.lora_rank.is_some() {
        args.lora_r = cfg.lora_rank;
        args.lora_r_origin = Some(format!("model.lora_rank in {shown}"));
    }
    if args.model_type.is_none() {
        args.model_type = cfg.model_type.clone();
    }
    args.use_film |= cfg.use_film == Some(true);
    args.use_proprio |= cfg.use_proprio == Some(true);
    // RLinf's model builder makes the LoRA with alpha = r; a config rank is the alpha too unless told.
    convert(&ckpt, &save, &args, Some(max_shard), OutFormat::Safetensors, out)
}

fn run(cli: Cli) -> ckptconv::Result<ExitCode> {
    if let Command::Scan { input, json } = &cli.command {
        return scan_cmd(input, *json);
    }
    run_conversion(cli).map(|()| ExitCode::SUCCESS)
}

/// Prints a scan report; exit 1 when the file names a global off the allowlist.
fn scan_cmd(path: &Path, json: bool) -> ckptconv::Result<ExitCode> {
    let input = if hosturl::is_url(path) {
        hosturl::open(&path.display().to_string())?
    } else {
        Input::new(path.display().to_string(), Box::new(fsio::FileInput::open(path)?))
    };
    let report = ckptconv::scan::scan(input)?;
    let text = if json { report.to_json() } else { scan_text(&report) };
    print!("{text}");
    Ok(if report.dangerous() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn scan_text(r: &ckptconv::scan::Report) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(t, "{}: {}", r.file, r.container.as_deref().unwrap_or("pickle-based file (not fully readable)"));
    let _ = writeln!(t, "globals named: {}", r.globals.len());
    let width = r.globals.iter().map(|g| g.name.len()).max().unwrap_or(0);
    for g in &r.globals {
        let call = g.call.as_deref().map(|c| format!(" ({c})")).unwrap_or_default();
        let _ = writeln!(t, "  {:width$}  {}{call}", g.name, g.class.label());
    }
    let refused: Vec<&str> = r.globals.iter().filter(|g| !g.weights_only).map(|g| g.name.as_str()).collect();
    let _ = if refused.is_empty() {
        writeln!(t, "torch.load(weights_only=True): accepts every global named")
    } else {
        writeln!(t, "torch.load(weights_only=True): refuses {}", refused.join(", "))
    };
    match &r.convert {
        Ok(ts) => {
            let _ = writeln!(t, "ckptconv: converts it ({} tensors)", ts.len());
            for x in ts {
                let _ = writeln!(t, "  {} {} {:?}", x.name, x.dtype, x.shape);
            }
        }
        Err(e) => {
            let _ = writeln!(t, "ckptconv: does not convert it: {e}");
        }
    }
    for u in &r.unchecked {
        let _ = writeln!(t, "not checked: {u}");
    }
    let bad = r.globals.iter().filter(|g| g.class.dangerous()).count();
    let _ = if !r.unchecked.is_empty() && bad == 0 {
        writeln!(t, "verdict: DANGEROUS (parts that could not be checked)")
    } else if bad == 0 {
        writeln!(t, "verdict: clean (every global is on the allowlist)")
    } else {
        writeln!(t, "verdict: DANGEROUS ({bad} global(s) off the allowlist)")
    };
    t
}

fn run_conversion(cli: Cli) -> ckptconv::Result<()> {
    match cli.command {
        Command::Scan { .. } => Ok(()),
        Command::Inspect { input, json, plan } => inspect(&input, json, &plan),
        Command::Convert { input, out_dir, plan, max_shard_size, format, out } => {
            convert(&input, &out_dir, &plan, max_shard_size, format, &out)
        }
        Command::Mg2hf { megatron_ckpt, hf_out, base_hf, mut plan, max_shard_size, out } => {
            plan.base = Some(base_hf);
            plan.megatron_only = true;
            convert(&megatron_ckpt, &hf_out, &plan, Some(max_shard_size), OutFormat::Safetensors, &out)
        }
        Command::DcpToPt { dcp_path, output_path, plan, out } => dcp_to_pt(&dcp_path, &output_path, &plan, &out),
        Command::Pt2hf { config, plan, max_shard_size, out } => pt2hf(&config, plan, max_shard_size, &out),
        Command::Verify { out_dir, against, plan } => verify_cmd(&out_dir, against.as_deref(), &plan),
    }
}

fn main() -> ExitCode {
    // clap exits with 2 on usage errors and 0 for --help/--version.
    let cli = Cli::parse();
    // Under `npx ckptconv` the host opens `/` and names the working folder, so relative paths mean what they
    // mean to the native binary.
    #[cfg(all(feature = "host-url", target_os = "wasi"))]
    if let Some(cwd) = std::env::var_os("CKPTCONV_HOST_CWD")
        && let Err(e) = std::env::set_current_dir(&cwd)
    {
        say!("ckptconv: error[io]: {}: {e}", cwd.to_string_lossy());
        return ExitCode::from(1);
    }
    // A panic is a bug, but it must still end in exit 1 with a message, not a crash code.
    std::panic::set_hook(Box::new(|info| {
        say!("ckptconv: internal error (please report): {info}");
    }));
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            say!("ckptconv: error[{}]: {e}", e.label());
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(1),
    }
}
