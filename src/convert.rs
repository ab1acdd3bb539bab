//! From inputs to a plan: detects the format and applies the user's options.

use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::io::Input;
use crate::plan::{Plan, PlannedTensor, Source};
use crate::select::{self, Prefix};
use crate::torch::TorchFile;

/// Options that shape the plan.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Cast float tensors to this dtype (`None`: keep).
    pub dtype: Option<DType>,
    /// Which tensors are the model.
    pub prefix: Prefix,
}

/// A plan plus what was detected, for reports.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The output tensors.
    pub plan: Plan,
    /// A one-line description of the detected input format.
    pub format: String,
}

/// Plans the conversion of a torch.save file.
pub fn plan_torch_file(input: &Input, opts: &PlanOptions) -> Result<Planned> {
    let file = TorchFile::open(input)?;
    let found = file.tensors(input, 0)?;
    if found.is_empty() {
        return Err(Error::new(ErrorKind::NoTensors(format!(
            "the pickled object ({}) holds no tensors",
            file.heap.describe(file.root)
        )))
        .in_file(&input.name));
    }
    let items = found.into_iter().map(|t| (t.path, t.view)).collect();
    let (kept, sel) = select::select(items, &opts.prefix).map_err(|e| e.in_file(&input.name))?;
    let mut notes = Vec::new();
    if !sel.prefix.is_empty() {
        notes.push(format!("model weights taken from '{}' (prefix stripped)", sel.prefix));
    }
    for (group, n) in &sel.skipped {
        notes.push(format!("skipped '{group}': {n} tensor(s), not model weights"));
    }
    let tensors = kept
        .into_iter()
        .map(|(name, view)| PlannedTensor::from_source(name, view.shape.clone(), Source::View(view), opts.dtype))
        .collect();
    Ok(Planned { plan: Plan { tensors, notes }, format: file.format.to_string() })
}
