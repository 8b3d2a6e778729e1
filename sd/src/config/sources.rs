//! Where settings come from: built-in defaults, config files (with `include`), `SDCTL_*`
//! environment variables and flags, layered with figment, lowest first. Lists are
//! concatenated (`admerge`), scalars are replaced by later layers.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Json, Toml, Yaml};
use figment::value::{Dict, Map, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};

use crate::config::problem::{Origin, Problem};
use crate::config::values::describe;
use crate::schema::{self, Default, FIELDS};

/// A layer we build in code (defaults, flags), named so origins can be told apart.
struct Layer {
    name: &'static str,
    dict: Dict,
}

const DEFAULTS: &str = "default";
const FLAGS: &str = "flags";
const PNG: &str = "png";

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }
    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

enum Kind {
    Toml,
    Yaml,
    Json,
}

fn kind(path: &Path) -> Result<Kind, String> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_lowercase)
    {
        Some(e) if e == "toml" => Ok(Kind::Toml),
        Some(e) if e == "yaml" || e == "yml" => Ok(Kind::Yaml),
        Some(e) if e == "json" => Ok(Kind::Json),
        _ => Err("unknown config format (use .toml, .yaml, .yml or .json)".into()),
    }
}

fn provider(path: &Path) -> Result<Figment, String> {
    Ok(match kind(path)? {
        Kind::Toml => Figment::from(Toml::file_exact(path)),
        Kind::Yaml => Figment::from(Yaml::file_exact(path)),
        Kind::Json => Figment::from(Json::file_exact(path)),
    })
}

/// One config file's own values (no layering), or a problem naming the file.
fn read_file(path: &Path) -> Result<Dict, Problem> {
    let p = |m: String| Problem::file(path, None, "", m);
    if !path.is_file() {
        return Err(p("config file not found".into()));
    }
    let fig = provider(path).map_err(p)?;
    let mut data = fig.data().map_err(|e| p(e.kind.to_string()))?;
    Ok(data.remove(&Profile::Default).unwrap_or_default())
}

/// The config files in layering order: each file's includes (recursively) come before it, so
/// the including file overrides what it includes. A file reached twice is layered once.
pub fn expand_includes(files: &[PathBuf], problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for f in files {
        visit(f, &mut Vec::new(), &mut out, problems);
    }
    out
}

fn visit(
    path: &Path,
    stack: &mut Vec<PathBuf>,
    out: &mut Vec<PathBuf>,
    problems: &mut Vec<Problem>,
) {
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if let Some(i) = stack.iter().position(|p| p == &canon) {
        let cycle: Vec<String> = stack[i..]
            .iter()
            .chain(std::iter::once(&canon))
            .map(|p| p.display().to_string())
            .collect();
        let from = stack.last().cloned().unwrap_or_default();
        problems.push(Problem::file(
            &from,
            find_line(&from, &[schema::INCLUDE_KEY]),
            schema::INCLUDE_KEY,
            format!("include cycle: {}", cycle.join(" -> ")),
        ));
        return;
    }
    if out.contains(&canon) {
        return;
    }
    let dict = match read_file(path) {
        Ok(d) => d,
        Err(e) => {
            problems.push(e);
            return;
        }
    };
    stack.push(canon.clone());
    if let Some(inc) = dict.get(schema::INCLUDE_KEY) {
        let base = canon.parent().unwrap_or(Path::new("."));
        let line = find_line(&canon, &[schema::INCLUDE_KEY]);
        match inc {
            Value::Array(_, items) => {
                for item in items {
                    match item.as_str() {
                        Some(s) => visit(&base.join(s), stack, out, problems),
                        None => problems.push(Problem::file(
                            &canon,
                            line,
                            schema::INCLUDE_KEY,
                            format!("expected a list of file names, found {}", describe(item)),
                        )),
                    }
                }
            }
            Value::String(_, s) => visit(&base.join(s), stack, out, problems),
            v => problems.push(Problem::file(
                &canon,
                line,
                schema::INCLUDE_KEY,
                format!("expected a list of file names, found {}", describe(v)),
            )),
        }
    }
    stack.pop();
    out.push(canon);
}

/// The built-in defaults as a layer.
fn defaults() -> Dict {
    let mut d = Dict::new();
    for f in FIELDS {
        let v = match f.default {
            Default::None => continue,
            Default::Str(s) => Value::from(s),
            Default::Int(i) => Value::from(i),
            Default::Float(x) => Value::from(x),
            Default::Bool(b) => Value::from(b),
        };
        d.insert(f.key.into(), v);
    }
    d
}

/// All layers merged: defaults, a PNG's settings, files (already include-expanded), env, flags.
pub fn compose(files: &[PathBuf], png: Option<Dict>, flags: Dict) -> Figment {
    let mut fig = Figment::from(Layer {
        name: DEFAULTS,
        dict: defaults(),
    });
    if let Some(dict) = png {
        fig = fig.admerge(Layer { name: PNG, dict });
    }
    for f in files {
        if let Ok(p) = provider(f) {
            fig = fig.admerge(p);
        }
    }
    let scalar_keys: Vec<&str> = FIELDS.iter().map(|f| f.key).collect();
    fig.admerge(Env::prefixed("SDCTL_").only(&scalar_keys))
        .admerge(Layer {
            name: FLAGS,
            dict: flags,
        })
}

/// The origin of a value, from the metadata of the layer that set it.
pub fn origin_of(fig: &Figment, tag: Tag, key_path: &[&str], png: Option<&Path>) -> Origin {
    let key = key_path.first().copied().unwrap_or("");
    match fig.get_metadata(tag) {
        Some(Metadata {
            source: Some(Source::File(p)),
            ..
        }) => Origin::File {
            path: p.clone(),
            line: find_line(p, key_path),
        },
        Some(m) if m.name == DEFAULTS => Origin::Default,
        Some(m) if m.name == FLAGS => Origin::Flag(schema::flag(key)),
        Some(m) if m.name == PNG => Origin::Png(png.unwrap_or(Path::new("")).to_path_buf()),
        Some(_) => Origin::Env(schema::env_var(key)),
        None => Origin::Default,
    }
}

/// Best-effort line of a key in a config file: `["steps"]` for a top-level key,
/// `["control", "2", "weight"]` for a key of the third `[[control]]` table of that file
/// (TOML and YAML; JSON top-level keys only).
pub fn find_line(path: &Path, key_path: &[&str]) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let is_key = |line: &str, key: &str| {
        let t = line.trim_start().trim_start_matches("- ");
        let t = t.trim_start_matches(['"', '\'']);
        t.strip_prefix(key).is_some_and(|rest| {
            let rest = rest.trim_start_matches(['"', '\'']).trim_start();
            rest.starts_with('=') || rest.starts_with(':')
        })
    };
    match key_path {
        [] => None,
        [key] => {
            // top level: before the first table header (TOML), unindented (YAML)
            for (i, l) in lines.iter().enumerate() {
                if l.trim_start().starts_with('[') && !l.contains('=') {
                    break;
                }
                if is_key(l, key) {
                    return Some(i + 1);
                }
            }
            None
        }
        [list, index, rest @ ..] => {
            let index: usize = index.parse().ok()?;
            let header = format!("[[{list}]]");
            let starts: Vec<usize> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.trim() == header)
                .map(|(i, _)| i)
                .collect();
            let (start, toml) = match starts.get(index) {
                Some(s) => (*s, true),
                None => {
                    // YAML: the index-th "- " item after "list:"
                    let at = lines.iter().position(|l| is_key(l, list))?;
                    let items: Vec<usize> = lines
                        .iter()
                        .enumerate()
                        .skip(at + 1)
                        .filter(|(_, l)| l.trim_start().starts_with("- "))
                        .map(|(i, _)| i)
                        .collect();
                    (*items.get(index)?, false)
                }
            };
            let Some(key) = rest.first() else {
                return Some(start + 1);
            };
            for (i, l) in lines.iter().enumerate().skip(start) {
                if i > start && toml && l.trim_start().starts_with('[') && !l.contains('=') {
                    break;
                }
                if i > start && !toml && l.trim_start().starts_with("- ") {
                    break;
                }
                if is_key(l, key) {
                    return Some(i + 1);
                }
            }
            Some(start + 1)
        }
    }
}
