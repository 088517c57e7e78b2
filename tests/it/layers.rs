//! The crate's layering: data flows one way through an ordered list of stages, and no module
//! may name a module of its own stage or a later one (so there are no cycles either). The
//! check reads every file under src/, follows each `crate::<module>` path and each
//! `super::`-chain that climbs out of its top-level module, and names every offending file
//! and path.
use std::path::{Path, PathBuf};

/// Top-level modules, lowest stage first; modules on one line share a stage (and so may not
/// use each other).
const STAGES: &[&[&str]] = &[
    &["error"],
    &["fs"],
    &["hash", "npy", "plot", "progress", "stats"],
    &["spec"],
    &["ops"],
    &["dist"],
    &["models"],
    &["data"],
    &["train"],
    &["experiment"],
    &["distortion"],
    &["knapsack"],
    &["secure"],
    &["pipeline"],
    &["cli"],
];

fn stage(module: &str) -> Option<usize> {
    STAGES.iter().position(|s| s.contains(&module))
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Punct(char),
}

/// Identifiers and punctuation of Rust source, comments and string and char literals left out.
fn tokens(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == 'r' && matches!(c.get(i + 1), Some('"') | Some('#')) && {
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            c.get(j) == Some(&'"')
        } {
            // Raw string: r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c[j] == '#' {
                hashes += 1;
                j += 1;
            }
            j += 1;
            loop {
                if c[j] == '"' && (0..hashes).all(|k| c.get(j + 1 + k) == Some(&'#')) {
                    i = j + 1 + hashes;
                    break;
                }
                j += 1;
            }
        } else if ch == '"' {
            i += 1;
            while c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if c.get(i + 1) == Some(&'\\') {
                i += 3;
                while c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push(Tok::Path);
            i += 2;
        } else {
            if !ch.is_whitespace() {
                out.push(Tok::Punct(ch));
            }
            i += 1;
        }
    }
    out
}

fn ident(t: Option<&Tok>) -> Option<&str> {
    match t {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

/// The first segment of every path a use-tree at `toks[i]` names: `a` for `a::b`, `a` and `c`
/// for `{a::b, c}`, and the tokens after it.
fn heads(toks: &[Tok], i: usize) -> Vec<String> {
    match toks.get(i) {
        Some(Tok::Ident(s)) => vec![s.clone()],
        Some(Tok::Punct('{')) => {
            let (mut out, mut depth, mut j, mut item_start) = (Vec::new(), 0, i, true);
            while j < toks.len() {
                match &toks[j] {
                    Tok::Punct('{') => {
                        depth += 1;
                        item_start = depth == 1;
                    }
                    Tok::Punct('}') => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    Tok::Punct(',') if depth == 1 => item_start = true,
                    Tok::Ident(s) if item_start && depth == 1 => {
                        out.push(s.clone());
                        item_start = false;
                    }
                    _ => item_start = false,
                }
                j += 1;
            }
            out
        }
        _ => Vec::new(),
    }
}

/// Where each `crate::`, `super::` or `self::` path starts (the index of its first token),
/// with the number of inline modules (`mod tests { .. }`) around it, which `super::` climbs
/// out of first.
fn path_starts(toks: &[Tok]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    // The brace depth each inline module opened at.
    let (mut inline, mut depth) = (Vec::<usize>::new(), 0usize);
    for (i, t) in toks.iter().enumerate() {
        match t {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth -= 1;
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
            }
            Tok::Ident(m)
                if m == "mod"
                    && ident(toks.get(i + 1)).is_some()
                    && toks.get(i + 2) == Some(&Tok::Punct('{')) =>
            {
                inline.push(depth);
            }
            Tok::Ident(k)
                if matches!(k.as_str(), "crate" | "super" | "self")
                    && (i == 0 || toks[i - 1] != Tok::Path)
                    && toks.get(i + 1) == Some(&Tok::Path) =>
            {
                out.push((i, inline.len()));
            }
            _ => {}
        }
    }
    out
}

/// Every top-level module a file names outside its own, with the path as written.
fn references(file_depth: usize, src: &str) -> Vec<(String, String)> {
    let toks = tokens(src);
    let mut out = Vec::new();
    for (i, inline) in path_starts(&toks) {
        match ident(toks.get(i)) {
            Some("crate") => {
                for h in heads(&toks, i + 2) {
                    out.push((h.clone(), format!("crate::{h}")));
                }
            }
            Some("super") => {
                let (mut n, mut j) = (0, i);
                while ident(toks.get(j)) == Some("super") && toks.get(j + 1) == Some(&Tok::Path) {
                    n += 1;
                    j += 2;
                }
                // Climbing to the crate root leaves the top-level module.
                if n >= file_depth + inline {
                    for h in heads(&toks, j) {
                        out.push((h.clone(), format!("{}{h}", "super::".repeat(n))));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_uses_a_later_stage() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if parts == ["lib"] || parts == ["main"] {
            continue; // the crate root declares the modules; the binary uses `brelu::`
        }
        let top = parts[0].as_str();
        let Some(own) = stage(top) else {
            bad.push(format!(
                "src/{}: module '{top}' has no stage in STAGES",
                rel.display()
            ));
            continue;
        };
        // src/a.rs and src/a/mod.rs are module `a` (depth 1), src/a/b.rs is `a::b` (depth 2).
        let depth = parts.len() - usize::from(parts.last().unwrap() == "mod");
        let text = std::fs::read_to_string(f).unwrap();
        for (module, path) in references(depth, &text) {
            if module == top {
                continue;
            }
            match stage(&module) {
                Some(s) if s < own => {}
                Some(s) => bad.push(format!(
                    "src/{}: `{path}`: {top} (stage {own}) must not use {module} (stage {s})",
                    rel.display()
                )),
                None => bad.push(format!(
                    "src/{}: `{path}`: '{module}' is not a module with a stage",
                    rel.display()
                )),
            }
        }
    }
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

#[test]
fn the_scanner_sees_paths_and_skips_comments_and_strings() {
    let src = r#"
        use crate::{error::Error, spec::{self, Spec}};
        use super::super::models::Model;
        // crate::cli in a comment
        const S: &str = "crate::pipeline";
        mod tests { use super::*; }
        fn f<'a>(x: &'a str) -> char { let _ = crate::hash::fnv_hex(x.bytes()); 'c' }
    "#;
    let refs: Vec<String> = references(2, src).into_iter().map(|r| r.1).collect();
    assert_eq!(
        refs,
        [
            "crate::error",
            "crate::spec",
            "super::super::models",
            "crate::hash"
        ]
    );
}

/// Every full path a use-tree at `toks[i]` names (`a::{b, c::d}` gives a::b and a::c::d), as
/// its identifiers.
fn use_paths(toks: &[Tok], i: usize) -> Vec<Vec<String>> {
    fn tree(toks: &[Tok], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
        let mut path = prefix;
        loop {
            match toks.get(i) {
                Some(Tok::Ident(s)) => {
                    path.push(s.clone());
                    i += 1;
                    if toks.get(i) == Some(&Tok::Path) {
                        i += 1;
                        continue;
                    }
                    out.push(path);
                    return i;
                }
                Some(Tok::Punct('{')) => {
                    i += 1;
                    while let Some(t) = toks.get(i) {
                        match t {
                            Tok::Punct('}') => return i + 1,
                            Tok::Punct(',') => i += 1,
                            _ => i = tree(toks, i, path.clone(), out),
                        }
                    }
                    return i;
                }
                _ => {
                    out.push(path);
                    return i + 1;
                }
            }
        }
    }
    let mut out = Vec::new();
    tree(toks, i, Vec::new(), &mut out);
    out
}

/// The module path of every `crate::`, `super::` and `self::` path in a file whose own module
/// path is `own` (src/a/b.rs: [a, b]; src/a/mod.rs: [a]).
fn module_paths(own: &[String], src: &str) -> Vec<Vec<String>> {
    let toks = tokens(src);
    let mut out = Vec::new();
    for (i, inline) in path_starts(&toks) {
        let mut j = i;
        let base: Vec<String> = if ident(toks.get(i)) == Some("crate") {
            j += 2;
            Vec::new()
        } else {
            let mut n = 0;
            while matches!(ident(toks.get(j)), Some("super") | Some("self"))
                && toks.get(j + 1) == Some(&Tok::Path)
            {
                n += usize::from(ident(toks.get(j)) == Some("super"));
                j += 2;
            }
            // `super` inside an inline module first climbs out of it, to this file.
            let n = n.saturating_sub(inline);
            own[..own.len().saturating_sub(n)].to_vec()
        };
        for p in use_paths(&toks, j) {
            out.push(base.iter().cloned().chain(p).collect());
        }
    }
    out
}

/// Import cycles between the files of one module: file A uses file B when a path in A names
/// B's module (not an enclosing module, whose items its children may use, nor a module inside
/// A). A cycle means neither file can be read, tested or replaced without the other.
#[test]
fn no_import_cycles_between_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let module = |f: &Path| -> Vec<String> {
        let mut parts: Vec<String> = f
            .strip_prefix(&src)
            .unwrap()
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if parts.last().is_some_and(|l| l == "mod") {
            parts.pop();
        }
        parts
    };
    let modules: Vec<Vec<String>> = files.iter().map(|f| module(f)).collect();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); files.len()];
    for (a, f) in files.iter().enumerate() {
        let own = &modules[a];
        let text = std::fs::read_to_string(f).unwrap();
        for p in module_paths(own, &text) {
            // The longest prefix of the path that is a file's module.
            let Some(b) = (1..=p.len())
                .rev()
                .find_map(|k| modules.iter().position(|m| *m == p[..k]))
            else {
                continue;
            };
            let m = &modules[b];
            let nested = own.starts_with(m) || m.starts_with(own);
            if b != a && !nested && !edges[a].contains(&b) {
                edges[a].push(b);
            }
        }
    }
    // Depth-first search; a back edge closes a cycle.
    let (mut state, mut stack, mut cycles) = (vec![0u8; files.len()], Vec::new(), Vec::new());
    fn visit(
        v: usize,
        edges: &[Vec<usize>],
        state: &mut [u8],
        stack: &mut Vec<usize>,
        cycles: &mut Vec<Vec<usize>>,
    ) {
        state[v] = 1;
        stack.push(v);
        for &w in &edges[v] {
            match state[w] {
                0 => visit(w, edges, state, stack, cycles),
                1 => {
                    let at = stack.iter().position(|&x| x == w).unwrap();
                    cycles.push(stack[at..].to_vec());
                }
                _ => {}
            }
        }
        stack.pop();
        state[v] = 2;
    }
    for v in 0..files.len() {
        if state[v] == 0 {
            visit(v, &edges, &mut state, &mut stack, &mut cycles);
        }
    }
    let shown: Vec<String> = cycles
        .iter()
        .map(|c| {
            let mut names: Vec<String> = c.iter().map(|&v| modules[v].join("::")).collect();
            names.push(names[0].clone());
            names.join(" -> ")
        })
        .collect();
    assert!(shown.is_empty(), "import cycles:\n{}", shown.join("\n"));
}

#[test]
fn the_cycle_scanner_resolves_paths() {
    let own: Vec<String> = ["secure", "noise"].map(String::from).to_vec();
    let src = r#"
        use super::party::Role;
        use crate::secure::{link::Link, wire::{self, Kind}};
        use self::inner::X;
        mod tests { use super::*; use super::super::ring::R; }
    "#;
    let got: Vec<String> = module_paths(&own, src)
        .iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(
        got,
        [
            "secure::party::Role",
            "secure::link::Link",
            "secure::wire::self",
            "secure::wire::Kind",
            "secure::noise::inner::X",
            "secure::noise",
            "secure::ring::R",
        ]
    );
}
