//! Parts for scale-out: the plan alone splits a conversion's output files into N parts of about equal bytes, so
//! any machine can write part I with no coordination, and a finishing step writes what makes the folder look done.
//!
//! A *data* file holds tensor bytes (a safetensors shard, a torch.save archive) and belongs to exactly one part;
//! every other file (the index, `config.json`, the adapter config, the base model's files) is *finishing*: small,
//! and written last, once every data file is there. The split is a pure function of the file list, so every machine
//! computes the same one.

use super::{OutputFile, OutputSet, Segment};
use crate::error::{Error, ErrorKind};
use crate::io::Input;
use crate::plan::Plan;

/// The most parts (or jobs) a split is asked for: beyond any cluster, and it keeps the work bounded.
pub const MAX_PARTS: usize = 1 << 16;

/// Part `index` (1-based) of `count`, as `--part I/N` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Which part, from 1.
    pub index: usize,
    /// How many parts in all.
    pub count: usize,
}

impl std::str::FromStr for Part {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Part, String> {
        let (i, n) = s.split_once('/').ok_or_else(|| format!("'{s}' is not I/N (e.g. 2/8)"))?;
        let parse = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("'{s}' is not I/N (e.g. 2/8)"));
        let (index, count) = (parse(i)?, parse(n)?);
        if count == 0 || count > MAX_PARTS {
            return Err(format!("the number of parts must be 1 to {MAX_PARTS}, not {count}"));
        }
        if index == 0 || index > count {
            return Err(format!("parts are numbered 1 to {count}, not {index}"));
        }
        Ok(Part { index, count })
    }
}

/// Whether `file` holds tensor bytes (and so belongs to a part) rather than being written by the finishing step.
pub fn is_data(file: &OutputFile) -> bool {
    file.segments.iter().any(|s| matches!(s, Segment::Tensors { .. } | Segment::TorchSave { .. }))
}

/// The data files of `files`, in writing order.
pub fn data_files(files: &[OutputFile]) -> Vec<usize> {
    (0..files.len()).filter(|&i| is_data(&files[i])).collect()
}

/// The finishing files of `files`, in writing order.
pub fn finishing(files: &[OutputFile]) -> Vec<usize> {
    (0..files.len()).filter(|&i| !is_data(&files[i])).collect()
}

/// Splits the files `which` (indices into `files`) into `n` groups of about equal bytes: largest first, each to the
/// group with the fewest bytes so far (the lowest-numbered on a tie). Each group lists its files in writing order;
/// groups beyond the number of files are empty. The same input gives the same split on every machine.
pub fn split(files: &[OutputFile], which: &[usize], n: usize) -> Vec<Vec<usize>> {
    let n = n.clamp(1, MAX_PARTS);
    let mut groups = vec![Vec::new(); n.min(which.len().max(1))];
    let mut by_size: Vec<usize> = which.iter().copied().filter(|&i| i < files.len()).collect();
    by_size.sort_by_key(|&i| (std::cmp::Reverse(files[i].size), i));
    // (bytes so far, group): the smallest pops first, ties by group number.
    let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> =
        (0..groups.len()).map(|g| std::cmp::Reverse((0, g))).collect();
    for i in by_size {
        let Some(std::cmp::Reverse((bytes, g))) = heap.pop() else { break };
        groups[g].push(i);
        heap.push(std::cmp::Reverse((bytes.saturating_add(files[i].size), g)));
    }
    for g in &mut groups {
        g.sort_unstable();
    }
    groups.resize(n, Vec::new());
    groups
}

/// The data files of part `part`, in writing order.
pub fn part_files(files: &[OutputFile], part: Part) -> Vec<usize> {
    split(files, &data_files(files), part.count).swap_remove(part.index - 1)
}

/// Data files that are not in `dir` as they should be: `(name, found size or None, planned size)`, given the size
/// of each file there (`None` when missing).
pub fn missing(files: &[OutputFile], size_of: &dyn Fn(&str) -> Option<u64>) -> Vec<(String, Option<u64>, u64)> {
    files
        .iter()
        .filter(|f| is_data(f))
        .filter_map(|f| {
            let found = size_of(&f.name);
            (found != Some(f.size)).then(|| (f.name.clone(), found, f.size))
        })
        .collect()
}

/// The error of a finishing step that found data files missing or of the wrong size, naming them (the first ten).
pub fn missing_error(missing: &[(String, Option<u64>, u64)], data_files: usize) -> Error {
    let shown: Vec<String> = missing
        .iter()
        .take(10)
        .map(|(name, found, want)| match found {
            None => format!("{name} is missing"),
            Some(n) => format!("{name} has {n} bytes, the plan says {want}"),
        })
        .collect();
    let more =
        if missing.len() > shown.len() { format!(" and {} more", missing.len() - shown.len()) } else { String::new() };
    Error::new(ErrorKind::Output(format!(
        "the finishing step needs every data file: {} of {data_files} are missing or incomplete (has every part \
         run?): {}{more}",
        missing.len(),
        shown.join(", ")
    )))
}

/// Some files of an output set, for writing a part or the finishing step through the one puller.
pub struct Subset<'a> {
    set: &'a dyn OutputSet,
    files: Vec<OutputFile>,
}

impl<'a> Subset<'a> {
    /// Files `which` of `set`, in the order given.
    pub fn new(set: &'a dyn OutputSet, which: &[usize]) -> Subset<'a> {
        let files = which.iter().filter_map(|&i| set.files().get(i).cloned()).collect();
        Subset { set, files }
    }

    /// The tensor bytes these files hold, for progress.
    pub fn tensor_bytes(&self) -> u64 {
        let mut total = 0u64;
        for f in &self.files {
            for s in &f.segments {
                let bytes = match s {
                    Segment::Tensors { plan, order } => self
                        .set
                        .plan(*plan)
                        .map_or(0, |p| order.iter().filter_map(|&i| p.tensors.get(i)).map(|t| t.nbytes()).sum::<u64>()),
                    Segment::TorchSave { plan, .. } => self.set.plan(*plan).map_or(0, Plan::total_bytes),
                    _ => 0,
                };
                total = total.saturating_add(bytes);
            }
        }
        total
    }
}

impl OutputSet for Subset<'_> {
    fn files(&self) -> &[OutputFile] {
        &self.files
    }
    fn plan(&self, i: usize) -> Option<&Plan> {
        self.set.plan(i)
    }
    fn inputs(&self) -> &[Input] {
        self.set.inputs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64, data: bool) -> OutputFile {
        let segments = if data {
            vec![Segment::Tensors { plan: 0, order: vec![] }]
        } else {
            vec![Segment::Bytes(vec![0; size as usize])]
        };
        OutputFile { name: name.into(), size, segments }
    }

    #[test]
    fn parses_parts() {
        assert_eq!("2/8".parse::<Part>(), Ok(Part { index: 2, count: 8 }));
        for bad in ["0/3", "4/3", "1/0", "x/3", "3", "1/99999999"] {
            assert!(bad.parse::<Part>().is_err(), "{bad}");
        }
    }

    #[test]
    fn splits_by_bytes_largest_first() {
        let files: Vec<OutputFile> = [9u64, 1, 5, 4, 3, 3]
            .iter()
            .enumerate()
            .map(|(i, &s)| file(&format!("f{i}"), s, true))
            .chain([file("index", 7, false)])
            .collect();
        let data: Vec<usize> = (0..6).collect();
        assert_eq!(split(&files, &data, 2), vec![vec![0, 1, 4], vec![2, 3, 5]]);
        assert_eq!(split(&files, &data, 1), vec![data.clone()]);
        // More parts than files: one file each, the rest empty.
        let eight = split(&files, &data, 8);
        assert_eq!(eight.len(), 8);
        assert_eq!(eight.iter().filter(|g| g.is_empty()).count(), 2);
        // Every file in exactly one part; the finishing file in none.
        for n in 1..=8 {
            let mut all: Vec<usize> = (1..=n).flat_map(|i| part_files(&files, Part { index: i, count: n })).collect();
            all.sort_unstable();
            assert_eq!(all, data, "n = {n}");
        }
        assert_eq!(finishing(&files), vec![6]);
    }

    #[test]
    fn names_missing_and_short_files() {
        let files = vec![file("a", 10, true), file("b", 20, true), file("c", 30, true), file("i", 5, false)];
        let m = missing(&files, &|n| match n {
            "a" => Some(10),
            "b" => Some(19),
            _ => None,
        });
        assert_eq!(m, vec![("b".into(), Some(19), 20), ("c".into(), None, 30)]);
        let text = missing_error(&m, 3).to_string();
        assert!(text.contains("2 of 3 are missing") && text.contains("b has 19 bytes, the plan says 20"), "{text}");
        assert!(text.contains("c is missing"), "{text}");
    }
}
