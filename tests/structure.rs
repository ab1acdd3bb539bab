//! The crate's shape, checked: the modules of `src/` import each other without a circle, format modules never
//! import the dispatcher or the pipeline, and the front ends (the CLI, the page's engine) hold no pipeline logic.
//! A `crate::module` path anywhere in a module's non-test code counts as an import of that module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The text of a file without its `#[cfg(test)]` module (tests may reach anywhere).
fn code_of(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap();
    match s.find("#[cfg(test)]\nmod tests") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Top-level modules each top-level module of the library refers to.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
        if rel.starts_with("bin/") || rel == "lib.rs" {
            continue;
        }
        let module = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
        let code = code_of(&f);
        let mut refs = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            if rest.starts_with('{') {
                // `use crate::{a, b::c}`: every top-level name in the braces.
                let inner = &rest[1..rest.find('}').unwrap_or(rest.len())];
                for part in inner.split(',') {
                    let name: String =
                        part.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    if !name.is_empty() {
                        refs.insert(name);
                    }
                }
            } else {
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                refs.insert(name);
            }
        }
        refs.retain(|r| r != &module && r.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
        graph.entry(module).or_default().extend(refs);
    }
    graph
}

#[test]
fn no_import_circle_in_src() {
    let graph = module_graph();
    assert!(graph.len() > 10, "the scan found too few modules: {graph:?}");
    // Depth-first search; a node met again while still on the stack closes a circle.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut circle = stack[i..].to_vec();
            circle.push(n.to_string());
            return Some(circle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(circle) = visit(n, &graph, &mut Vec::new(), &mut done) {
            panic!("import circle in src/: {}", circle.join(" -> "));
        }
    }
}

#[test]
fn formats_are_leaves_below_the_dispatcher() {
    let graph = module_graph();
    for format in ["torch", "dcp", "megatron", "verl", "pickle"] {
        let refs = graph.get(format).unwrap_or_else(|| panic!("no module {format}"));
        for above in ["detect", "conversion"] {
            assert!(!refs.contains(above), "format module {format} imports {above}");
        }
    }
}

#[test]
fn front_ends_hold_no_pipeline_logic() {
    // Sequencing (LoRA finish, output layout, adapter files, base-model files) belongs to conversion.rs; a front end
    // that names one of these is redoing it.
    let pipeline = [
        "::finish(",
        "safetensors::layout",
        "as_adapter(",
        "TorchSaveLayout",
        "copy_into(",
        "save_helpers(",
        ".format.starts_with",
    ];
    for front in ["src/bin/ckptconv/main.rs", "web/src/wasm.rs"] {
        let code = code_of(&Path::new(ROOT).join(front));
        for p in pipeline {
            assert!(!code.contains(p), "{front} holds pipeline logic: {p}");
        }
    }
}
