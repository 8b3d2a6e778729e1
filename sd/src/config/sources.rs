//! Where settings come from: built-in defaults, config files (with `include`), `SDCTL_*`
//! environment variables and flags, layered with figment, lowest first. Lists are
//! concatenated (`admerge`), scalars are replaced by later layers.

use std::collections::HashMap;
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

/// One config file as a layer: its text read once (a regular file, bounded in size and
/// nesting: `sd_plugins_api::config_text`), parsed by figment's TOML, YAML or JSON provider,
/// with the file as its source (for origins).
struct FileLayer {
    path: PathBuf,
    kind: Kind,
    text: String,
}

impl Provider for FileLayer {
    fn metadata(&self) -> Metadata {
        let name = match self.kind {
            Kind::Toml => "TOML file",
            Kind::Yaml => "YAML file",
            Kind::Json => "JSON file",
        };
        Metadata::from(name, Source::File(self.path.clone()))
    }
    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        match self.kind {
            Kind::Toml => Toml::string(&self.text).data(),
            Kind::Yaml => Yaml::string(&self.text).data(),
            Kind::Json => Json::string(&self.text).data(),
        }
    }
}

fn provider(path: &Path) -> Result<FileLayer, String> {
    let kind = kind(path)?;
    let text = sd_plugins_api::config_text::read_config(path)
        .map_err(|e| sd_plugins_api::config_text::without_path(path, &e).to_string())?;
    Ok(FileLayer {
        path: path.to_path_buf(),
        kind,
        text,
    })
}

/// One config file's own values (no layering), or a problem naming the file. A parser's
/// message is kept short: a file that is no config at all (a log) is not quoted whole.
fn read_file(path: &Path) -> Result<Dict, Problem> {
    let p = |m: String| Problem::file(path, None, "", m);
    if !path.exists() {
        return Err(p("config file not found".into()));
    }
    let layer = provider(path).map_err(p)?;
    let mut data = layer.data().map_err(|e| {
        p(sd_plugins_api::config_text::short_message(
            &e.kind.to_string(),
            8,
        ))
    })?;
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

/// `SDCTL_*` variables that name a list or file structure (`SDCTL_LORA`, `SDCTL_CONTROL`,
/// `SDCTL_PLUGINS`, `SDCTL_INCLUDE`): only scalar settings come from the environment, so
/// each of these is a problem that says how to give it instead (rather than being ignored).
pub fn env_problems() -> Vec<Problem> {
    let how = |key: &str| {
        match key {
        "lora" => "give LoRAs with --lora PATH[:WEIGHT] or [[lora]] tables in a --config file",
        "control" => "give control units with --control KEY=VALUE,... or [[control]] tables in a --config file",
        "plugins" => "give plugins with --plugin or [[plugins]] tables in a --config file",
        _ => "list the files in a --config file's `include`, or give --config more than once",
    }
    };
    schema::LIST_KEYS
        .iter()
        .chain([&schema::INCLUDE_KEY])
        .filter_map(|key| {
            let var = schema::env_var(key);
            std::env::var_os(&var)?;
            Some(Problem::at(
                &Origin::Env(var),
                *key,
                format!("lists are not read from the environment: {}", how(key)),
            ))
        })
        .collect()
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
/// (TOML and YAML; JSON top-level keys only). Each file is indexed once (per thread, while its
/// size and time stay the same), so asking for every key of thousands of tables stays linear.
pub fn find_line(path: &Path, key_path: &[&str]) -> Option<usize> {
    thread_local! {
        static INDEXES: std::cell::RefCell<HashMap<PathBuf, (FileStamp, LineIndex)>> =
            std::cell::RefCell::new(HashMap::new());
    }
    let stamp = FileStamp::of(path)?;
    INDEXES.with(|cell| {
        let mut map = cell.borrow_mut();
        let fresh = map.get(path).is_some_and(|(s, _)| *s == stamp);
        if !fresh {
            let text = sd_plugins_api::input_file::read_to_string(path).ok()?;
            map.insert(path.to_path_buf(), (stamp, LineIndex::new(&text)));
        }
        map.get_mut(path)?.1.find(key_path)
    })
}

/// A file's size and modification time: an index is rebuilt when either changes.
#[derive(PartialEq)]
struct FileStamp(u64, Option<std::time::SystemTime>);

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self(m.len(), m.modified().ok()))
    }
}

/// The key a line sets (`key = ...`, `key: ...`, `- key: ...`, quoted or not), if any.
fn line_key(line: &str) -> Option<&str> {
    let t = line.trim_start().trim_start_matches("- ");
    let t = t.trim_start_matches(['"', '\'']);
    let end = t
        .find(|c: char| c == '"' || c == '\'' || c == '=' || c == ':' || c.is_whitespace())
        .unwrap_or(t.len());
    let (key, rest) = t.split_at(end);
    let rest = rest.trim_start_matches(['"', '\'']).trim_start();
    (!key.is_empty() && (rest.starts_with('=') || rest.starts_with(':'))).then_some(key)
}

/// Where keys and list entries are in one config file.
struct LineIndex {
    /// Top-level keys (before the first table header) and their first line (0-based).
    top: HashMap<String, usize>,
    /// Every key's first line (YAML lists are found after their key's line).
    first: HashMap<String, usize>,
    /// `[[NAME]]` header lines, by NAME.
    headers: HashMap<String, Vec<usize>>,
    /// Lines starting with `- ` (YAML list items).
    dashes: Vec<usize>,
    /// Whether each line is a TOML table header.
    is_header: Vec<bool>,
    /// Keys of the table starting at a line, filled when first asked.
    sections: HashMap<(usize, bool), HashMap<String, usize>>,
    keys: Vec<Option<String>>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut ix = LineIndex {
            top: HashMap::new(),
            first: HashMap::new(),
            headers: HashMap::new(),
            dashes: Vec::new(),
            is_header: Vec::new(),
            sections: HashMap::new(),
            keys: Vec::new(),
        };
        let mut in_top = true;
        for (i, l) in text.lines().enumerate() {
            let header = l.trim_start().starts_with('[') && !l.contains('=');
            in_top &= !header;
            let key = line_key(l).map(str::to_string);
            if let Some(k) = &key {
                if in_top {
                    ix.top.entry(k.clone()).or_insert(i);
                }
                ix.first.entry(k.clone()).or_insert(i);
            }
            let t = l.trim();
            if let Some(name) = t.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
                ix.headers.entry(name.to_string()).or_default().push(i);
            }
            if l.trim_start().starts_with("- ") {
                ix.dashes.push(i);
            }
            ix.is_header.push(header);
            ix.keys.push(key);
        }
        ix
    }

    /// The 1-based line of `key_path` (see [`find_line`]).
    fn find(&mut self, key_path: &[&str]) -> Option<usize> {
        match key_path {
            [] => None,
            [key] => self.top.get(*key).map(|i| i + 1),
            [list, index, rest @ ..] => {
                let index: usize = index.parse().ok()?;
                let (start, toml) = match self.headers.get(*list).and_then(|s| s.get(index)) {
                    Some(s) => (*s, true),
                    None => {
                        // YAML: the index-th "- " item after "list:"
                        let at = *self.first.get(*list)?;
                        let after = self.dashes.partition_point(|&d| d <= at);
                        (*self.dashes.get(after + index)?, false)
                    }
                };
                let Some(key) = rest.first() else {
                    return Some(start + 1);
                };
                let keys = &self.keys;
                let is_header = &self.is_header;
                let dashes = &self.dashes;
                let section = self.sections.entry((start, toml)).or_insert_with(|| {
                    let mut m = HashMap::new();
                    for i in start..keys.len() {
                        if i > start && toml && is_header[i] {
                            break;
                        }
                        if i > start && !toml && dashes.binary_search(&i).is_ok() {
                            break;
                        }
                        if let Some(k) = &keys[i] {
                            m.entry(k.clone()).or_insert(i);
                        }
                    }
                    m
                });
                Some(section.get(*key).map_or(start, |i| *i) + 1)
            }
        }
    }
}
