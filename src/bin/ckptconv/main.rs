//! The `ckptconv` command line (native and wasm32-wasip1 from the same source).
//!
//! Exit codes: 0 success, 1 a clear error on stderr, 2 a usage error.

mod fsio;
mod progress;

use ckptconv::convert::{self, PlanOptions, Planned};
use ckptconv::dtype::DType;
use ckptconv::io::Input;
use ckptconv::select::Prefix;
use ckptconv::write::safetensors::{self, OutputLayout};
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
    /// Show the detected format and the planned output tensors (name, dtype, shape, bytes).
    Inspect {
        /// A torch.save file (.pt, .pth, .bin).
        input: PathBuf,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Convert a checkpoint to safetensors in OUT_DIR.
    Convert {
        /// A torch.save file (.pt, .pth, .bin).
        input: PathBuf,
        /// Output folder (created if missing).
        out_dir: PathBuf,
        #[command(flatten)]
        plan: PlanArgs,
        /// Split into shards of at most this size (e.g. 5GB, 500MB, 2GiB) plus an index.
        #[arg(long, value_parser = parse_size)]
        max_shard_size: Option<u64>,
        /// Overwrite output files that already exist.
        #[arg(long)]
        force: bool,
        /// Never show a progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Output dtype for float tensors: keep, bf16, fp16 or fp32.
    #[arg(long, default_value = "keep", value_parser = parse_dtype)]
    dtype: CastTo,
    /// Take only tensors under this dotted prefix and strip it ('' keeps every tensor). Default: strip a
    /// wrapping state_dict/model/module/model_state_dict key when present.
    #[arg(long)]
    prefix: Option<String>,
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

fn open_and_plan(path: &Path, args: &PlanArgs) -> ckptconv::Result<(Vec<Input>, Planned)> {
    let data = fsio::FileInput::open(path)?;
    let input = Input::new(path.display().to_string(), Box::new(data));
    let planned = convert::plan_torch_file(&input, &args.options())?;
    Ok((vec![input], planned))
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
    let (_inputs, planned) = open_and_plan(input, args)?;
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
        let doc = serde_json::json!({
            "input": input.display().to_string(), "format": planned.format, "notes": plan.notes,
            "tensors": tensors, "total_bytes": plan.total_bytes(),
        });
        println!("{doc:#}");
        return Ok(());
    }
    println!("input:   {}", input.display());
    println!("format:  {}", planned.format);
    for n in &plan.notes {
        println!("note:    {n}");
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
    force: bool,
    quiet: bool,
) -> ckptconv::Result<()> {
    let (inputs, planned) = open_and_plan(input, args)?;
    let layout: OutputLayout = safetensors::layout(&planned.plan, max_shard)?;
    let mut sink = fsio::DirSink::new(out_dir, force)?;
    let names: Vec<&str> = layout.files.iter().map(|f| f.name.as_str()).collect();
    sink.check_free(&names)?;
    eprintln!("ckptconv: {} is {}", input.display(), planned.format);
    for n in &planned.plan.notes {
        eprintln!("ckptconv: {n}");
    }
    let total = planned.plan.total_bytes();
    let mut bar = progress::Progress::new(total, !quiet);
    safetensors::write(&planned.plan, &layout, &inputs, &mut sink, &mut |done| bar.update(done))?;
    bar.finish();
    eprintln!(
        "ckptconv: wrote {} tensors ({}) to {}: {}",
        planned.plan.tensors.len(),
        human(total),
        out_dir.display(),
        names.join(", ")
    );
    Ok(())
}

fn run(cli: Cli) -> ckptconv::Result<()> {
    match cli.command {
        Command::Inspect { input, json, plan } => inspect(&input, json, &plan),
        Command::Convert { input, out_dir, plan, max_shard_size, force, quiet } => {
            convert(&input, &out_dir, &plan, max_shard_size, force, quiet)
        }
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
