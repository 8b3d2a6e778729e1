//! The house shows its design: no two modules of any crate import each other, directly or
//! around a loop. An import is a `use` or a path in code (`crate::a::b`, `super::x`,
//! `self::x`, or a child module's name); a parent's `mod child;` declaration is not one, but
//! a parent's `pub use child::X` is, and so is a child's `use super::Item`. The crate root
//! (lib.rs / main.rs) is the crate's front: it declares and re-exports, and is no module in
//! the graph; a path through one of its re-exports (`crate::Error` for `pub use
//! error::Error`) is an import of the module the item comes from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every `.rs` file of a crate's `src/` with its module path.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap();
            let mut parts: Vec<String> = rel
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            let file = parts.pop().unwrap();
            let stem = file.trim_end_matches(".rs");
            if !matches!(stem, "mod" | "lib" | "main") {
                parts.push(stem.to_string());
            } else if stem != "mod" && !parts.is_empty() {
                continue; // a bin's main.rs below src/bin is its own crate
            }
            out.insert(parts, p);
        }
    }
    out
}

/// Source text without comments, string and char literals (so paths in docs don't count).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
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
                    i += 1;
                }
            }
        } else if b[i] == b'r' && matches!(b.get(i + 1), Some(b'"') | Some(b'#')) {
            // raw string r"..." / r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            i = j + close.len();
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' {
            // a char literal ('x', '\n', '\u{..}') or a lifetime ('a)
            let lit = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|p| i + 3 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 3)
            } else {
                None
            };
            match lit {
                Some(end) => {
                    out.push_str("' '");
                    i = end;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn ident_at(s: &[u8], mut i: usize) -> (String, usize) {
    let start = i;
    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
        i += 1;
    }
    (String::from_utf8_lossy(&s[start..i]).into_owned(), i)
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The paths of a `use` tree starting at `i` (after `use `), braces expanded.
fn use_tree(s: &[u8], i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut i = skip_ws(s, i);
    let mut path = prefix;
    loop {
        i = skip_ws(s, i);
        if s.get(i) == Some(&b'{') {
            i += 1;
            loop {
                i = skip_ws(s, i);
                if s.get(i) == Some(&b'}') {
                    return i + 1;
                }
                i = use_tree(s, i, path.clone(), out);
                i = skip_ws(s, i);
                if s.get(i) == Some(&b',') {
                    i += 1;
                }
                if i >= s.len() {
                    return i;
                }
            }
        }
        let (id, j) = ident_at(s, i);
        if id.is_empty() {
            // `*` or the end
            if s.get(i) == Some(&b'*') {
                i += 1;
            }
            out.push(path);
            return i;
        }
        path.push(id);
        i = skip_ws(s, j);
        if s[i..].starts_with(b"::") {
            i += 2;
            continue;
        }
        if s[i..].starts_with(b"as") {
            let (_, j) = ident_at(s, skip_ws(s, i + 2));
            i = j;
        }
        out.push(path);
        return i;
    }
}

/// Paths this file's code names (`use` trees, and `crate::` / `super::` / `self::` /
/// `child::` paths in expressions and types), each with the inline modules (`mod tests {`)
/// it sits in, which `super::` and `self::` count from.
fn paths(code: &str, children: &BTreeSet<String>) -> Vec<(Vec<String>, Vec<String>)> {
    let s = code.as_bytes();
    let mut out = Vec::new();
    // inline modules open at the brace depth recorded
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let within = |inline: &Vec<(String, usize)>| -> Vec<String> {
        inline.iter().map(|(n, _)| n.clone()).collect()
    };
    while i < s.len() {
        match s[i] {
            b'{' => {
                depth += 1;
                i += 1;
                continue;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                i += 1;
                continue;
            }
            _ => {}
        }
        let boundary = i == 0 || !(s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'_');
        if !boundary || !(s[i].is_ascii_alphabetic() || s[i] == b'_') {
            i += 1;
            continue;
        }
        let (id, j) = ident_at(s, i);
        let preceded_by_colons = i >= 2 && &s[i - 2..i] == b"::";
        if id == "mod" {
            let (name, k) = ident_at(s, skip_ws(s, j));
            let k = skip_ws(s, k);
            if !name.is_empty() && s.get(k) == Some(&b'{') {
                inline.push((name, depth));
                depth += 1;
                i = k + 1;
                continue;
            }
        }
        if id == "use" {
            let mut found = Vec::new();
            i = use_tree(s, j, Vec::new(), &mut found);
            let at = within(&inline);
            out.extend(found.into_iter().map(|p| (p, at.clone())));
            continue;
        }
        let children_here = inline.is_empty() && children.contains(&id);
        if !preceded_by_colons
            && (id == "crate" || id == "super" || id == "self" || children_here)
            && s[j..].starts_with(b"::")
        {
            let mut path = vec![id];
            let mut k = j;
            while s[k..].starts_with(b"::") {
                let (next, e) = ident_at(s, k + 2);
                if next.is_empty() {
                    break;
                }
                path.push(next);
                k = e;
            }
            out.push((path, within(&inline)));
            i = k;
            continue;
        }
        i = j;
    }
    out
}

/// The module a path names, seen from module `from`: the longest known prefix.
fn target(
    file: &Module,
    inline: &[String],
    path: &[String],
    known: &BTreeMap<Module, PathBuf>,
    children: &BTreeSet<String>,
) -> Option<Module> {
    // `super::` inside `mod tests {` of a file is the file's own module
    let from: Module = file.iter().chain(inline).cloned().collect();
    let from = &from;
    let mut base: Module;
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => {
            base = Vec::new();
            rest = &path[1..];
        }
        Some("super") | Some("self") => {
            base = from.clone();
            while let Some(seg) = rest.first() {
                match seg.as_str() {
                    "super" => {
                        base.pop()?;
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
        }
        Some(first) if inline.is_empty() && children.contains(first) => base = from.clone(),
        _ => return None, // another crate, std, or a local name
    }
    let mut best = base.clone();
    for seg in rest {
        base.push(seg.clone());
        if known.contains_key(&base) {
            best = base.clone();
        } else {
            break;
        }
    }
    Some(best)
}

/// Names the crate root re-exports, with the module each comes from.
fn root_exports(
    known: &BTreeMap<Module, PathBuf>,
    children: &BTreeSet<String>,
) -> BTreeMap<String, Module> {
    let Some(file) = known.get(&Vec::new()) else {
        return BTreeMap::new();
    };
    let code = code_only(&std::fs::read_to_string(file).unwrap());
    let mut out = BTreeMap::new();
    for (p, inline) in paths(&code, children) {
        let Some(name) = p.last() else { continue };
        if let Some(t) = target(&Vec::new(), &inline, &p, known, children).filter(|t| !t.is_empty())
        {
            out.insert(name.clone(), t);
        }
    }
    out
}

/// Edges between modules of one crate (the root is no node; see the top of this file).
fn graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let known = modules(src);
    let children_of = |m: &Module| -> BTreeSet<String> {
        known
            .keys()
            .filter(|k| k.len() == m.len() + 1 && k.starts_with(m))
            .map(|k| k.last().unwrap().clone())
            .collect()
    };
    let exports = root_exports(&known, &children_of(&Vec::new()));
    let mut g: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, file) in known.iter().filter(|(m, _)| !m.is_empty()) {
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        let children = children_of(m);
        let edges = g.entry(m.clone()).or_default();
        for (p, inline) in paths(&code, &children) {
            let Some(mut t) = target(m, &inline, &p, &known, &children) else {
                continue;
            };
            if t.is_empty() {
                // through the root: the module a re-exported name comes from
                let name = p
                    .iter()
                    .find(|s| !matches!(s.as_str(), "crate" | "super" | "self"));
                match name.and_then(|n| exports.get(n)) {
                    Some(from) => t = from.clone(),
                    None => continue,
                }
            }
            if &t != m {
                edges.insert(t);
            }
        }
    }
    g
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct St<'a> {
        g: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        on: BTreeSet<&'a Module>,
        stack: Vec<&'a Module>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(st: &mut St<'a>, v: &'a Module) {
        st.index.insert(v, st.next);
        st.low.insert(v, st.next);
        st.next += 1;
        st.stack.push(v);
        st.on.insert(v);
        if let Some(ws) = st.g.get(v) {
            for w in ws {
                let Some((w, _)) = st.g.get_key_value(w) else {
                    continue;
                };
                if !st.index.contains_key(w) {
                    visit(st, w);
                    let l = st.low[w].min(st.low[v]);
                    st.low.insert(v, l);
                } else if st.on.contains(w) {
                    let l = st.index[w].min(st.low[v]);
                    st.low.insert(v, l);
                }
            }
        }
        if st.low[v] == st.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = st.stack.pop().unwrap();
                st.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                st.out.push(comp);
            }
        }
    }
    let mut st = St {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        on: BTreeSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !st.index.contains_key(v) {
            visit(&mut st, v);
        }
    }
    st.out
}

fn show(c: &[Module]) -> String {
    c.iter()
        .map(|m| {
            if m.is_empty() {
                "crate".to_string()
            } else {
                m.join("::")
            }
        })
        .collect::<Vec<_>>()
        .join(" <-> ")
}

fn workspace_crates() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = manifest
        .split("members = [")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .unwrap();
    members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .map(|m| root.join(m).join("src"))
        .filter(|p| p.is_dir())
        .collect()
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let crates = workspace_crates();
    assert!(crates.len() >= 8, "found only {crates:?}");
    let mut found = Vec::new();
    for src in &crates {
        for c in cycles(&graph(src)) {
            found.push(format!("{}: {}", src.display(), show(&c)));
        }
    }
    assert!(
        found.is_empty(),
        "import circles:\n  {}",
        found.join("\n  ")
    );
}

/// The checker itself finds the kinds of circle it is there for.
#[test]
fn the_checker_finds_circles() {
    let dir = std::env::temp_dir().join(format!("module-graph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let write = |p: &str, text: &str| {
        let p = dir.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "lib.rs",
        "mod a;\nmod b;\nmod c;\nmod s;\nmod t;\nmod clean;\npub use c::Thing;\n",
    );
    // a <-> b through `use crate::` and an expression path
    write(
        "a.rs",
        "use crate::b::{x, y::{self, z}};\nfn t() -> crate::Thing { todo!() }\n",
    );
    write(
        "b.rs",
        "pub fn f() { crate::a::g(); }\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
    );
    // b -> c through the root's re-export; c -> b
    write("c.rs", "pub struct Thing(crate::b::B);\n");
    write("b2.rs", "");
    // a parent and its child: `pub use child::X` and `use super::Y`
    write("s/mod.rs", "mod child;\npub use child::X;\npub struct Y;\n");
    write("s/child.rs", "use super::Y; pub struct X;\n");
    // `super::` in a file's inline `mod tests {` is that file, not its parent
    write("t/mod.rs", "mod leaf;\npub use leaf::Z;\n");
    write(
        "t/leaf.rs",
        "pub struct Z;\nmod tests { use super::Z; fn f() { super::Z; } }\n",
    );
    // comments and strings do not count; another crate's `crate::` neither
    write(
        "clean.rs",
        "// crate::a::g\nconst S: &str = \"crate::a\";\nuse sd_pipeline::loader;\n",
    );
    let mut c = cycles(&graph(&dir));
    c.sort();
    let shown: Vec<String> = c.iter().map(|c| show(c)).collect();
    assert_eq!(shown, vec!["a <-> b <-> c", "s <-> s::child"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
