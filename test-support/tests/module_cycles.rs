//! No module imports a module that imports it back, in any crate of the workspace.
//!
//! A circle between modules means neither can be read, tested or moved without the other, so
//! each crate's modules must form layers. This test reads every workspace crate's `src/`, builds
//! the import graph of each crate target (`lib.rs`, `main.rs`, `src/bin/*.rs`) and fails naming
//! every circle it finds, with the line of each import on it.
//!
//! The scan is plain text, which is enough for how this workspace writes Rust: comments,
//! strings and char literals are blanked first; then `use crate::a::…`, `use crate::{a, b::c}`
//! groups, `use super::…`/`self::…` and paths in code (`crate::a::f()`, `super::x`, and `a::f()`
//! where `a` is a child module) are imports of the longest module prefix they name. Items of
//! `lib.rs`/`main.rs` belong to the root module, `crate`. `mod x;` declares a module and is no
//! import. Inline modules (`mod tests { … }`) count as part of their file's module, so a test
//! module's `use super::*` is not an import of its own parent.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail by panicking"
)]

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt::Write as _,
    path::{Path, PathBuf},
};

/// A module's path inside its crate: empty for the root.
type ModPath = Vec<String>;

/// Where a crate target's sources come from: the disk, or fixtures in the scanner's own tests.
trait Sources {
    fn read(&self, path: &Path) -> Option<String>;
}

struct Disk;

impl Sources for Disk {
    fn read(&self, path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }
}

impl Sources for BTreeMap<PathBuf, String> {
    fn read(&self, path: &Path) -> Option<String> {
        self.get(path).cloned()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

impl Token {
    fn ident(&self) -> Option<&str> {
        match &self.tok {
            Tok::Ident(s) => Some(s),
            _ => None,
        }
    }

    fn is(&self, c: char) -> bool {
        self.tok == Tok::Punct(c)
    }
}

/// Splits Rust source into identifiers, `::` and single punctuation, dropping comments,
/// string, byte-string, raw-string and char literals, numbers and lifetimes.
fn lex(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    // Skips a quoted literal whose opening quote is at `i`, honouring escapes.
    let skip_quoted = |i: &mut usize, line: &mut usize, quote: char| {
        *i += 1;
        while *i < c.len() && c[*i] != quote {
            if c[*i] == '\\' {
                *i += 1;
            }
            if at(*i) == '\n' {
                *line += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            skip_quoted(&mut i, &mut line, '"');
        } else if ch == '\'' {
            if at(i + 1) == '\\' {
                skip_quoted(&mut i, &mut line, '\'');
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime or label: its name lexes as an identifier, which is harmless.
                i += 1;
            }
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                i += 1;
            }
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let raw_prefix = word == "r" || word == "br" || word == "cr";
            if raw_prefix && (at(i) == '"' || at(i) == '#') {
                let mut hashes = 0;
                while at(i + hashes) == '#' {
                    hashes += 1;
                }
                if at(i + hashes) == '"' {
                    // A raw string: ends at a quote followed by as many hashes.
                    i += hashes + 1;
                    while i < c.len() && !(c[i] == '"' && (1..=hashes).all(|h| at(i + h) == '#')) {
                        if c[i] == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                    i += hashes + 1;
                    continue;
                }
                if word == "r" && hashes == 1 {
                    // A raw identifier, `r#type`.
                    i += 1;
                    continue;
                }
            }
            if (word == "b" || word == "c") && at(i) == '"' {
                skip_quoted(&mut i, &mut line, '"');
                continue;
            }
            if word == "b" && at(i) == '\'' {
                skip_quoted(&mut i, &mut line, '\'');
                continue;
            }
            out.push(Token {
                tok: Tok::Ident(word),
                line,
            });
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(ch),
                line,
            });
            i += 1;
        }
    }
    out
}

/// What one file says: the modules it declares with `mod x;`, and the paths it names (each
/// with its line and how many inline modules enclose it).
#[derive(Debug, Default)]
struct Scan {
    children: Vec<String>,
    paths: Vec<Reference>,
}

#[derive(Debug)]
struct Reference {
    segments: Vec<String>,
    line: usize,
    /// Inline modules around the reference; `super` climbs out of these first.
    inline_depth: usize,
}

fn scan(tokens: &[Token]) -> Scan {
    let mut out = Scan::default();
    let mut depth = 0usize;
    // Brace depths at which the open inline modules started.
    let mut inline: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        let prev = i.checked_sub(1).map(|p| &tokens[p].tok);
        match &t.tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
            }
            Tok::Ident(w) if w == "mod" => {
                if let Some(name) = tokens.get(i + 1).and_then(Token::ident) {
                    match tokens.get(i + 2) {
                        Some(n) if n.is(';') && inline.is_empty() => {
                            out.children.push(name.to_string());
                        }
                        Some(n) if n.is('{') => inline.push(depth),
                        _ => {}
                    }
                }
            }
            Tok::Ident(w) if w == "use" && prev != Some(&Tok::PathSep) => {
                let line = t.line;
                i += 1;
                let mut paths = Vec::new();
                use_tree(tokens, &mut i, &[], &mut paths);
                for segments in paths {
                    out.paths.push(Reference {
                        segments,
                        line,
                        inline_depth: inline.len(),
                    });
                }
                continue;
            }
            Tok::Ident(_)
                if tokens.get(i + 1).is_some_and(|n| n.tok == Tok::PathSep)
                    && prev != Some(&Tok::PathSep)
                    && prev != Some(&Tok::Punct('$')) =>
            {
                let line = t.line;
                let mut segments = Vec::new();
                while let Some(word) = tokens.get(i).and_then(Token::ident) {
                    segments.push(word.to_string());
                    if tokens.get(i + 1).is_some_and(|n| n.tok == Tok::PathSep) {
                        i += 2;
                    } else {
                        i += 1;
                        break;
                    }
                }
                out.paths.push(Reference {
                    segments,
                    line,
                    inline_depth: inline.len(),
                });
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Reads one use tree (`a::b::{c, d::*, e as f}`) starting at `tokens[*i]`, pushing every
/// full path it names onto `out`; stops after the tree, before `,` `}` or `;`.
fn use_tree(tokens: &[Token], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    while let Some(t) = tokens.get(*i) {
        match &t.tok {
            Tok::Ident(w) if w == "as" => {
                *i += 2;
                break;
            }
            Tok::Ident(w) => {
                path.push(w.clone());
                *i += 1;
            }
            Tok::PathSep => *i += 1,
            Tok::Punct('*') => {
                *i += 1;
                break;
            }
            Tok::Punct('{') => {
                *i += 1;
                while let Some(t) = tokens.get(*i) {
                    if t.is('}') {
                        *i += 1;
                        break;
                    }
                    if t.is(',') {
                        *i += 1;
                        continue;
                    }
                    let before = *i;
                    use_tree(tokens, i, &path, out);
                    if *i == before {
                        *i += 1;
                    }
                }
                return;
            }
            _ => break,
        }
    }
    if path.last().is_some_and(|s| s == "self") {
        path.pop();
    }
    out.push(path);
}

/// A crate target's modules, their files, and the imports between them.
#[derive(Debug, Default)]
struct Graph {
    /// Every module, with the file that holds it.
    modules: BTreeMap<ModPath, PathBuf>,
    /// `from -> to`, with the file and line of the first import found.
    edges: BTreeMap<(ModPath, ModPath), (PathBuf, usize)>,
}

/// Builds the import graph of the crate target whose root file is `root`.
fn graph(sources: &impl Sources, root: &Path) -> Graph {
    let mut g = Graph::default();
    let mut scans: BTreeMap<ModPath, Scan> = BTreeMap::new();
    let mut queue = VecDeque::from([(Vec::new(), root.to_path_buf(), true)]);
    while let Some((module, file, owns_dir)) = queue.pop_front() {
        let Some(src) = sources.read(&file) else {
            continue;
        };
        let s = scan(&lex(&src));
        let dir = if owns_dir {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        for child in &s.children {
            let mut path = module.clone();
            path.push(child.clone());
            let flat = dir.join(format!("{child}.rs"));
            let nested = dir.join(child).join("mod.rs");
            if sources.read(&flat).is_some() {
                queue.push_back((path, flat, false));
            } else {
                queue.push_back((path, nested, true));
            }
        }
        g.modules.insert(module.clone(), file);
        scans.insert(module, s);
    }
    for (module, s) in &scans {
        let children: BTreeSet<&str> = s.children.iter().map(String::as_str).collect();
        for r in &s.paths {
            let Some(target) = resolve(&g.modules, module, &children, r) else {
                continue;
            };
            if &target != module {
                g.edges
                    .entry((module.clone(), target))
                    .or_insert_with(|| (g.modules[module].clone(), r.line));
            }
        }
    }
    g
}

/// The module a path names from inside `module`: the longest known module prefix of the
/// absolute path. `None` for paths into other crates, types and locals.
fn resolve(
    modules: &BTreeMap<ModPath, PathBuf>,
    module: &ModPath,
    children: &BTreeSet<&str>,
    r: &Reference,
) -> Option<ModPath> {
    let first = r.segments.first()?.as_str();
    let (mut absolute, rest): (ModPath, &[String]) = match first {
        "crate" => (Vec::new(), &r.segments[1..]),
        "self" => (module.clone(), &r.segments[1..]),
        "super" => {
            let supers = r.segments.iter().take_while(|s| *s == "super").count();
            // `super` leaves the enclosing inline modules before it leaves the file's module.
            let up = supers.saturating_sub(r.inline_depth);
            let keep = module.len().checked_sub(up)?;
            (module[..keep].to_vec(), &r.segments[supers..])
        }
        child if children.contains(child) => (module.clone(), &r.segments[..]),
        _ => return None,
    };
    let mut found = absolute.clone();
    for s in rest {
        absolute.push(s.clone());
        if modules.contains_key(&absolute) {
            found = absolute.clone();
        } else {
            break;
        }
    }
    Some(found)
}

fn name(m: &ModPath) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// Every circle in `g`, as `a -> b -> a` lines each followed by the imports that close it:
/// for each strongly connected group of modules, the shortest circle through each member.
fn cycles(g: &Graph) -> Vec<String> {
    let mut next: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
    for (from, to) in g.edges.keys() {
        next.entry(from).or_default().push(to);
    }
    let reaches = |from: &ModPath, to: &ModPath| -> Option<Vec<ModPath>> {
        // Shortest path from `from` to `to` by breadth-first search.
        let mut parent: BTreeMap<&ModPath, &ModPath> = BTreeMap::new();
        let mut queue = VecDeque::from([from]);
        while let Some(m) = queue.pop_front() {
            for n in next.get(m).into_iter().flatten() {
                if parent.contains_key(n) || *n == from {
                    if *n == to {
                        parent.entry(n).or_insert(m);
                    }
                    continue;
                }
                parent.insert(n, m);
                queue.push_back(n);
            }
            if parent.contains_key(to) {
                break;
            }
        }
        let mut path = vec![to.clone()];
        let mut at = to;
        loop {
            let p = parent.get(at)?;
            path.push((*p).clone());
            if *p == from {
                break;
            }
            at = p;
        }
        path.reverse();
        Some(path)
    };
    let mut seen: BTreeSet<Vec<ModPath>> = BTreeSet::new();
    let mut out = Vec::new();
    for module in g.modules.keys() {
        let Some(cycle) = reaches(module, module) else {
            continue;
        };
        // One entry per circle, whichever member it was found from.
        let mut key = cycle[..cycle.len() - 1].to_vec();
        let start = key
            .iter()
            .enumerate()
            .min_by_key(|(_, m)| *m)
            .map(|(i, _)| i)
            .unwrap_or(0);
        key.rotate_left(start);
        if !seen.insert(key) {
            continue;
        }
        let mut text = cycle.iter().map(name).collect::<Vec<_>>().join(" -> ");
        for pair in cycle.windows(2) {
            let (file, line) = &g.edges[&(pair[0].clone(), pair[1].clone())];
            let _ = write!(
                text,
                "\n      {} -> {}: {}:{line}",
                name(&pair[0]),
                name(&pair[1]),
                file.display()
            );
        }
        out.push(text);
    }
    out
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `members` of the workspace's Cargo.toml.
fn members() -> Vec<String> {
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    let list = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .expect("a members list in the workspace Cargo.toml");
    list.split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

/// The root files of a crate's targets: `src/lib.rs`, `src/main.rs`, `src/bin/*.rs`.
fn targets(krate: &Path) -> Vec<PathBuf> {
    let src = krate.join("src");
    let mut roots: Vec<PathBuf> = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .filter(|p| p.exists())
        .collect();
    if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
        let mut bins: Vec<PathBuf> = bins
            .filter_map(|e| {
                let p = e.ok()?.path();
                if p.extension().is_some_and(|x| x == "rs") {
                    Some(p)
                } else {
                    Some(p.join("main.rs")).filter(|m| m.exists())
                }
            })
            .collect();
        bins.sort();
        roots.extend(bins);
    }
    roots
}

/// The circles in every target of the crate in folder `member`, one report line each.
fn crate_cycles(member: &str) -> Vec<String> {
    let root = workspace_root();
    let krate = root.join(member);
    let mut out = Vec::new();
    for target in targets(&krate) {
        let g = graph(&Disk, &target);
        let shown = target
            .strip_prefix(&root)
            .unwrap_or(&target)
            .display()
            .to_string();
        // Name files from the workspace root, as a reader would open them.
        let prefix = format!("{}/", root.display());
        out.extend(
            cycles(&g)
                .into_iter()
                .map(|c| format!("{shown}: {}", c.replace(&prefix, ""))),
        );
    }
    out
}

fn assert_no_cycles(member: &str) {
    let found = crate_cycles(member);
    assert!(
        found.is_empty(),
        "module import circles in {member} (each module must not import one that imports it \
         back; move what both need into a module below them):\n  {}",
        found.join("\n  ")
    );
}

macro_rules! every_crate {
    ($($test:ident => $member:literal,)*) => {
        $(
            #[test]
            fn $test() {
                assert_no_cycles($member);
            }
        )*

        const CHECKED: &[&str] = &[$($member),*];
    };
}

every_crate! {
    cli_has_no_module_cycles => "cli",
    controlplane_has_no_module_cycles => "controlplane",
    core_has_no_module_cycles => "core",
    crds_has_no_module_cycles => "crds",
    demo_has_no_module_cycles => "demo",
    fuzz_has_no_module_cycles => "fuzz",
    observe_has_no_module_cycles => "observe",
    policies_has_no_module_cycles => "policies",
    rollout_controller_has_no_module_cycles => "rollout-controller",
    sidecar_has_no_module_cycles => "sidecar",
    simulations_has_no_module_cycles => "simulations",
    test_support_has_no_module_cycles => "test-support",
    store_has_no_module_cycles => "store",
}

#[test]
fn every_workspace_crate_is_checked() {
    let mut want = members();
    want.sort();
    let mut have: Vec<String> = CHECKED.iter().map(|m| (*m).to_string()).collect();
    have.sort();
    assert_eq!(
        have,
        want,
        "add the new crate to every_crate! in {}",
        file!()
    );
}

// The scanner itself, on small crates written in the styles the workspace uses.

fn fixture(files: &[(&str, &str)]) -> BTreeMap<PathBuf, String> {
    files
        .iter()
        .map(|(p, s)| (PathBuf::from(p), (*s).to_string()))
        .collect()
}

fn edges_of(files: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    let g = graph(&fixture(files), Path::new("src/lib.rs"));
    g.edges.keys().map(|(a, b)| (name(a), name(b))).collect()
}

fn edge(a: &str, b: &str) -> (String, String) {
    (a.into(), b.into())
}

#[test]
fn scanner_reads_use_groups_code_paths_and_super() {
    let edges = edges_of(&[
        (
            "src/lib.rs",
            "pub mod a;\npub mod b;\nmod c;\npub use a::Thing;\nfn f() { c::run(); }",
        ),
        (
            "src/a.rs",
            "use crate::{b::{self, X}, c::Y as Z};\nuse std::fmt;\nmod inner { fn g() { super::h(); } }",
        ),
        ("src/b.rs", "pub mod deep;\nfn f() -> u8 { crate::c::N }"),
        ("src/b/deep.rs", "use super::super::Root;\nuse super::X;"),
        ("src/c/mod.rs", "mod leaf;\nuse leaf::L;"),
        ("src/c/leaf.rs", "fn f() { let _ = self::g; }"),
    ]);
    let want: BTreeSet<_> = [
        edge("crate", "a"),
        edge("crate", "c"),
        edge("a", "b"),
        edge("a", "c"),
        edge("b", "c"),
        edge("b::deep", "crate"),
        edge("b::deep", "b"),
        edge("c", "c::leaf"),
    ]
    .into();
    assert_eq!(edges, want);
}

#[test]
fn scanner_ignores_comments_strings_macros_and_test_modules() {
    let edges = edges_of(&[
        ("src/lib.rs", "mod a;\nmod b;"),
        (
            "src/a.rs",
            r####"
            //! See [`crate::b`].
            /* crate::b::x() */
            const S: &str = "crate::b::x";
            const R: &str = r#"use crate::b;"#;
            const C: char = '"'; const L: &'static str = "";
            macro_rules! m { () => { $crate::b::x() } }
            #[cfg(test)]
            mod tests {
                use super::*;
                fn f() { super::g(); }
            }
            "####,
        ),
        ("src/b.rs", "use crate::a::Thing;"),
    ]);
    assert_eq!(edges, [edge("b", "a")].into());
}

#[test]
fn circles_are_named_with_their_imports() {
    let files = fixture(&[
        ("src/lib.rs", "mod a;\nmod b;\nmod c;"),
        ("src/a.rs", "use crate::b::X;"),
        ("src/b.rs", "\nuse crate::c::Y;"),
        ("src/c.rs", "fn f() { crate::a::z(); }"),
    ]);
    let found = cycles(&graph(&files, Path::new("src/lib.rs")));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("a -> b -> c -> a\n"), "{}", found[0]);
    assert!(found[0].contains("b -> c: src/b.rs:2"), "{}", found[0]);
}
