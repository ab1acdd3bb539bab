//! The `ckptconv` command line (native and wasm32-wasip1 from the same source).
//!
//! Exit codes: 0 success, 1 a clear error on stderr, 2 a usage error.

mod fsio;
mod progress;

use ckptconv::convert::{self, PlanOptions, Planned};
use ckptconv::dtype::DType;
use ckptconv::hf::BaseModel;
use ckptconv::io::Input;
use ckptconv::select::Prefix;
use ckptconv::write::safetensors::{self, OutputLayout};
use ckptconv::write::torch_save::{self, TorchSaveLayout};
use ckptconv::{Error, ErrorKind};
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
    /// Never show a progress bar.
    #[arg(long)]
    quiet: bool,
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
}

/// The parsed `--dtype` (a newtype, since clap reads a bare `Option` field as "flag may be absent").
#[derive(Clone, Copy)]
struct CastTo(Option<DType>);

fn parse_dtype(s: &str) -> Result<CastTo, String> {
    DType::from_cli(s).map(CastTo)
}

fn parse_size(s: &str) -> Result<u64, String> {
    safetensors::parse_size(s)
}

impl PlanArgs {
    fn options(&self) -> PlanOptions {
        PlanOptions {
            dtype: self.dtype.0,
            prefix: match &self.prefix {
                Some(p) => Prefix::Explicit(p.clone()),
                None => Prefix::Auto,
            },
        }
    }
}

/// Runs `f` with the base model of `--base`, if one was given.
fn with_base<T>(base: Option<&Path>, f: impl FnOnce(Option<&BaseModel>) -> ckptconv::Result<T>) -> ckptconv::Result<T> {
    match base {
        None => f(None),
        Some(p) => {
            if !p.is_dir() {
                return Err(Error::new(ErrorKind::NotCheckpoint("the base model is not a folder".into()))
                    .in_file(&p.display().to_string()));
            }
            let folder = fsio::DiskFolder::open(p)?;
            let base = BaseModel::open(&folder)?;
            f(Some(&base))
        }
    }
}

fn open_and_plan(path: &Path, base: Option<&BaseModel>, args: &PlanArgs) -> ckptconv::Result<Planned> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| Error::new(ErrorKind::Io(e.to_string())).in_file(&shown))?;
    if meta.is_dir() {
        let folder = fsio::DiskFolder::open(path)?;
        convert::plan_folder(&folder, base, &args.options())
    } else {
        let data = fsio::FileInput::open(path)?;
        convert::plan_torch_file(Input::new(shown, Box::new(data)), &args.options())
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
    let planned = with_base(args.base.as_deref(), |base| open_and_plan(input, base, args))?;
    let plan = &planned.plan;
    if json {
        let tensors: Vec<_> = plan
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "dtype": t.dtype.safetensors_name(), "shape": t.shape, "bytes": t.nbytes(),
                    "source_dtype": t.source.dtype().safetensors_name(),
                })
            })
            .collect();
        let groups: Vec<_> = planned
            .groups
            .iter()
            .map(|g| serde_json::json!({"name": g.name, "tensors": g.tensors, "bytes": g.bytes, "others": g.others}))
            .collect();
        let doc = serde_json::json!({
            "input": input.display().to_string(), "format": planned.format, "notes": plan.notes,
            "groups": groups, "tensors": tensors, "total_bytes": plan.total_bytes(),
        });
        println!("{doc:#}");
        return Ok(());
    }
    println!("input:   {}", input.display());
    println!("format:  {}", planned.format);
    for n in &plan.notes {
        println!("note:    {n}");
    }
    println!("groups:");
    for g in &planned.groups {
        let others = if g.others > 0 { format!(", {} non-tensor item(s)", g.others) } else { String::new() };
        println!("  {:<40} {:>7} tensor(s) {:>12}{others}", g.name, g.tensors, human(g.bytes));
    }
    println!("tensors: {} ({} in {})", plan.tensors.len(), human(plan.total_bytes()), plan.total_bytes());
    println!();
    let w = plan.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    println!("{:<w$}  {:<7}  {:<20}  {:>14}", "name", "dtype", "shape", "bytes");
    for t in &plan.tensors {
        let shape = format!("{:?}", t.shape);
        println!("{:<w$}  {:<7}  {:<20}  {:>14}", t.name, t.dtype.safetensors_name(), shape, t.nbytes());
    }
    Ok(())
}

fn convert(
    input: &Path,
    out_dir: &Path,
    args: &PlanArgs,
    max_shard: Option<u64>,
    format: OutFormat,
    out: &OutArgs,
) -> ckptconv::Result<()> {
    with_base(args.base.as_deref(), |base| {
        let planned = open_and_plan(input, base, args)?;
        let package: Vec<&str> = base.map(|b| b.files.iter().map(String::as_str).collect()).unwrap_or_default();
        let (mut sink, names) = match format {
            OutFormat::Safetensors => {
                let layout: OutputLayout = safetensors::layout(&planned.plan, max_shard)?;
                let mut names: Vec<&str> = layout.files.iter().map(|f| f.name.as_str()).collect();
                names.extend(&package);
                let mut sink = prepare(out_dir, &names, out, input, &planned)?;
                let mut bar = progress::Progress::new(planned.plan.total_bytes(), !out.quiet);
                safetensors::write(&planned.plan, &layout, &planned.inputs, &mut sink, &mut |d| bar.update(d))?;
                bar.finish();
                (sink, names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            }
            OutFormat::Pt => {
                if max_shard.is_some() {
                    return Err(Error::new(ErrorKind::Unsupported(
                        "--max-shard-size applies to safetensors output".into(),
                    )));
                }
                let mut names = vec!["pytorch_model.bin"];
                names.extend(&package);
                let sink = write_pt(&planned, out_dir, "pytorch_model.bin", &names, out, input)?;
                (sink, names.iter().map(|n| n.to_string()).collect())
            }
        };
        if let Some(b) = base {
            b.copy_into(&mut sink)?;
        }
        use ckptconv::write::Sink;
        sink.commit()?;
        report(&planned, out_dir, &names);
        Ok(())
    })
}

fn prepare(
    out_dir: &Path,
    names: &[&str],
    out: &OutArgs,
    input: &Path,
    planned: &Planned,
) -> ckptconv::Result<fsio::DirSink> {
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = names.iter().find(|n| !seen.insert(**n)) {
        return Err(Error::new(ErrorKind::Output(format!("two outputs are both named {dup}"))));
    }
    let sink = fsio::DirSink::new(out_dir, out.force)?;
    sink.check_free(names)?;
    eprintln!("ckptconv: {} is {}", input.display(), planned.format);
    for n in &planned.plan.notes {
        eprintln!("ckptconv: {n}");
    }
    Ok(sink)
}

fn report(planned: &Planned, out_dir: &Path, names: &[String]) {
    eprintln!(
        "ckptconv: wrote {} tensors ({}) to {}: {}",
        planned.plan.tensors.len(),
        human(planned.plan.total_bytes()),
        out_dir.display(),
        names.join(", ")
    );
}

/// Writes `name` as a torch.save file; the caller commits the returned sink.
fn write_pt(
    planned: &Planned,
    out_dir: &Path,
    name: &str,
    names: &[&str],
    out: &OutArgs,
    input: &Path,
) -> ckptconv::Result<fsio::DirSink> {
    let root = Path::new(name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or("archive".into());
    let layout = TorchSaveLayout::new(&planned.plan, &root)?;
    let mut sink = prepare(out_dir, names, out, input, planned)?;
    let mut bar = progress::Progress::new(planned.plan.total_bytes(), !out.quiet);
    torch_save::write(&planned.plan, &layout, name, &planned.inputs, &mut sink, &mut |d| bar.update(d))?;
    bar.finish();
    Ok(sink)
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
    let planned = open_and_plan(dcp_path, None, args)?;
    let mut sink = write_pt(&planned, &dir, &name, &[name.as_str()], out, dcp_path)?;
    use ckptconv::write::Sink;
    sink.commit()?;
    report(&planned, &dir, &[name]);
    Ok(())
}

fn run(cli: Cli) -> ckptconv::Result<()> {
    match cli.command {
        Command::Inspect { input, json, plan } => inspect(&input, json, &plan),
        Command::Convert { input, out_dir, plan, max_shard_size, format, out } => {
            convert(&input, &out_dir, &plan, max_shard_size, format, &out)
        }
        Command::Mg2hf { megatron_ckpt, hf_out, base_hf, mut plan, max_shard_size, out } => {
            plan.base = Some(base_hf);
            convert(&megatron_ckpt, &hf_out, &plan, Some(max_shard_size), OutFormat::Safetensors, &out)
        }
        Command::DcpToPt { dcp_path, output_path, plan, out } => dcp_to_pt(&dcp_path, &output_path, &plan, &out),
    }
}

fn main() -> ExitCode {
    // clap exits with 2 on usage errors and 0 for --help/--version.
    let cli = Cli::parse();
    // A panic is a bug, but it must still end in exit 1 with a message, not a crash code.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("ckptconv: internal error (please report): {info}");
    }));
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("ckptconv: error: {e}");
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(1),
    }
}
