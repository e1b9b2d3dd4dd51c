//! The module map of `src/lib.rs` holds: no module imports from a layer above its own.
//!
//! Reads every `src/**/*.rs`, finds each path into the crate (`crate::x…`, also inside
//! `use crate::{x, y::z}` groups) outside comments and string literals, and checks that the
//! top-level module it names is in the importing file's layer or one below. The layers are
//! written once, here, and stated in `src/lib.rs`; a test below checks the two agree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top to bottom; a module may use its own layer's modules and those of lower layers. Modules
/// of the top layer do not use each other.
const LAYERS: &[&[&str]] = &[
    &["run", "ops", "indexer"],
    &["cli", "config"],
    &["source"],
    &["event"],
    &["sink"],
    &["checkpoint"],
    &["kafka"],
    &["metrics", "logging", "signals"],
    &["model"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of `text` with comments and string/char literals blanked (lines kept), so that
/// paths in docs and messages do not count.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
            continue;
        }
        if c == b'r' && matches!(b.get(i + 1), Some(b'"') | Some(b'#')) {
            // A raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) == Some(&b'"') {
                j += 1;
                loop {
                    match b.get(j) {
                        None => break,
                        Some(b'"') if (0..hashes).all(|k| b.get(j + 1 + k) == Some(&b'#')) => {
                            j += 1 + hashes;
                            break;
                        }
                        Some(b'\n') => out.push('\n'),
                        _ => {}
                    }
                    j += 1;
                }
                i = j;
                continue;
            }
        }
        if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if i < b.len() && b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime ('a).
            let rest = &text[i..];
            let end = if let Some(escaped) = rest.strip_prefix("'\\") {
                escaped.find('\'').map(|e| e + 3)
            } else {
                rest.char_indices()
                    .nth(2)
                    .filter(|(_, ch)| *ch == '\'')
                    .map(|(k, _)| k + 1)
            };
            if let Some(end) = end {
                i += end;
                continue;
            }
        }
        out.push(c as char);
        i += 1;
    }
    out
}

/// Top-level modules named after `crate::` in `code`, with their line numbers. A `{…}` group
/// is read to its closing brace, over as many lines as rustfmt spreads it.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(found_at) = code[from..].find("crate::") {
        let at = from + found_at;
        from = at + "crate::".len();
        let before = &code[..at];
        // `$crate::` in macros, or an identifier ending in `crate`.
        if before.ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let line = before.matches('\n').count() + 1;
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            found.extend(group_heads(group).into_iter().map(|m| (line, m)));
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((line, name));
            }
        }
    }
    found
}

/// The first segment of each path in a `{a, b::c, d::{e, f}}` group (up to its closing brace).
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut at_start = true;
    let mut word = String::new();
    for c in group.chars() {
        let ident = c.is_alphanumeric() || c == '_';
        if depth == 0 && ident && at_start {
            word.push(c);
            continue;
        }
        if depth == 0 && !word.is_empty() {
            heads.push(std::mem::take(&mut word));
            at_start = false;
        }
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_start = true,
            _ => {}
        }
    }
    if !word.is_empty() {
        heads.push(word);
    }
    heads
}

/// The top-level module a file under `src/` belongs to (`None` for the crate root and the
/// binaries, which may use anything).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    all.sort();
    let mut problems = Vec::new();
    let mut seen_modules = BTreeMap::new();
    for file in &all {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(own) = layer_of(&module) else {
            problems.push(format!(
                "{}: module `{module}` is in no layer of tests/layers.rs",
                file.display()
            ));
            continue;
        };
        seen_modules.insert(module.clone(), own);
        let text = std::fs::read_to_string(file).expect("a source file");
        for (line, used) in crate_paths(&code_only(&text)) {
            if used == module {
                continue;
            }
            let Some(theirs) = layer_of(&used) else {
                continue; // a crate-root item, e.g. a macro
            };
            let top_peers = own == 0 && theirs == 0;
            if theirs < own || top_peers {
                problems.push(format!(
                    "{}:{line}: `{module}` (layer {own}) uses `crate::{used}` (layer {theirs})",
                    file.strip_prefix(&src).unwrap_or(file).display()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "imports that point up the layers (src/lib.rs has the map):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_module_map_in_lib_rs_names_the_same_layers() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("src/lib.rs");
    for (rank, layer) in LAYERS.iter().enumerate() {
        let line = format!(
            "{rank}. {}",
            layer
                .iter()
                .map(|m| format!("[`{m}`]"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert!(
            lib.contains(&line),
            "src/lib.rs's module map lacks the line {line:?}"
        );
    }
}

#[test]
fn the_scanner_reads_paths_not_prose() {
    let code = code_only(
        "use crate::{a, b::{c, d}, e::f};\n// crate::comment\nlet s = \"crate::string\";\n\
         let r = r#\"crate::raw\"#; let c = '\"'; x::<'a>(crate::g::h);\n/* crate::block */",
    );
    let names: Vec<String> = crate_paths(&code).into_iter().map(|(_, m)| m).collect();
    assert_eq!(names, ["a", "b", "e", "g"]);
    // rustfmt's form of a long group: one path per line.
    let code = code_only("use std::fmt;\nuse crate::{\n    a::X,\n    b::{c, d},\n};\nfn f() {}\n");
    assert_eq!(
        crate_paths(&code),
        [(2, "a".to_string()), (2, "b".to_string())]
    );
}
