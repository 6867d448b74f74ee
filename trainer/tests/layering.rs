//! The trainer's modules form layers and no module reaches upward: each `crate::<module>` path
//! in code (not in comments) of `trainer/src/<module>` names a module of a lower layer. A new
//! upward import fails here with the file, the line and both layers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// Bottom to top. A module may use the modules of the layers below its own.
const LAYERS: &[&[&str]] = &[
    &["error", "rng", "kernels", "workers", "test_util"],
    &[
        "atomic_file",
        "data",
        "distributed",
        "loss",
        "optim",
        "metrics",
        "plan",
    ],
    &["model"],
    &["checkpoint"],
    &["eval"],
    &["train"],
    &["config", "run", "tiny_base"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file of `src` belongs to (`model/llama/attention.rs` → `model`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The modules named by `crate::<name>` in `line`.
fn crate_paths(line: &str) -> Vec<String> {
    line.match_indices("crate::")
        .map(|(i, _)| {
            line[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut upward = Vec::new();
    let mut unlayered = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if ["lib", "main"].contains(&module.as_str()) {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            unlayered.push(module);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for mut used in crate_paths(code) {
                // The crate root re-exports the error module's `Result` and `TrainerError`.
                if used == "Result" || used == "TrainerError" {
                    used = "error".into();
                }
                // `crate::{Result, TrainerError}` (the error layer) names no module.
                if used == module || used.is_empty() {
                    continue;
                }
                match layer_of(&used) {
                    Some(theirs) if theirs < own => {}
                    theirs => upward.push(format!(
                        "{}:{}: {module} (layer {own}) uses crate::{used} (layer {theirs:?})",
                        file.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    unlayered.sort();
    unlayered.dedup();
    assert!(
        unlayered.is_empty(),
        "modules missing from LAYERS: {unlayered:?}"
    );
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn the_check_sees_an_upward_path() {
    assert_eq!(
        crate_paths("use crate::train::step::{StepSettings}; crate::eval::x"),
        ["train", "eval"]
    );
    assert!(layer_of("model") < layer_of("train"));
}
