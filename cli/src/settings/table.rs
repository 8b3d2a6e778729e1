//! Walking one table of merged values (the top level, or one `[[control]]` / `[[lora]]` /
//! `[[plugins]]` entry) against its fields: typed, range-checked, each with its origin.

use std::path::{Path, PathBuf};

use figment::value::{Dict, Value};
use figment::Figment;
use sd_controlnet::spec::PreprocessorChoice;
use sd_plugins_api::ParamValue;

use sd::config::problem::{resolve, Origin, Problem};
use sd::config::sources::origin_of;
use sd::config::values::{describe, num_f64, num_int};
use sd::schema::{self, Field, PathRole, Ty};

/// A checked value.
#[derive(Debug, Clone, PartialEq)]
pub enum Typed {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Path(PathBuf),
    /// A preprocessor given as a table: name and parameters.
    Preprocessor(PreprocessorChoice),
}

/// A value with where it came from, as `config show` prints it.
#[derive(Debug, Clone)]
pub struct Shown {
    pub key: String,
    pub value: Typed,
    pub origin: Origin,
}

/// The validated settings: the job, where its results go, and what `config show` prints.
/// Convert one value to `ty`. Files are strict about types; env and flags give strings,
/// which are parsed.
fn typed(v: &Value, ty: Ty, origin: &Origin) -> Result<Typed, String> {
    let lenient = !matches!(origin, Origin::File { .. });
    let found = || describe(v);
    match ty {
        Ty::Str => match v {
            Value::String(_, s) => Ok(Typed::Str(s.clone())),
            Value::Num(..) | Value::Bool(..) if lenient => Ok(Typed::Str(match v {
                Value::Bool(_, b) => b.to_string(),
                _ => describe(v).trim_start_matches("number ").to_string(),
            })),
            _ => Err(format!("expected a string, found {}", found())),
        },
        Ty::Int { min, max } => {
            let i = match v {
                Value::Num(_, n) => {
                    num_int(*n).ok_or_else(|| format!("expected an integer, found {}", found()))?
                }
                Value::String(_, s) if lenient => s
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| format!("expected an integer, found {}", found()))?,
                _ => return Err(format!("expected an integer, found {}", found())),
            };
            if i < min || i > max {
                return Err(format!("{i} is out of range {min}..={max}"));
            }
            Ok(Typed::Int(i))
        }
        Ty::Float { min, max } => {
            let x = match v {
                Value::Num(_, n) => num_f64(*n),
                Value::String(_, s) if lenient => s
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| format!("expected a number, found {}", found()))?,
                _ => return Err(format!("expected a number, found {}", found())),
            };
            // the one message: `must be a finite number in [0, 100], got inf`
            let x = sd_plugins_api::number::Range::closed(min, max).check(x)?;
            Ok(Typed::Float(x))
        }
        Ty::Bool => match v {
            Value::Bool(_, b) => Ok(Typed::Bool(*b)),
            Value::String(_, s) if lenient && (s == "true" || s == "false") => {
                Ok(Typed::Bool(s == "true"))
            }
            _ => Err(format!("expected true or false, found {}", found())),
        },
        Ty::Choice(choices) => match v {
            Value::String(_, s) if choices.contains(&s.as_str()) => Ok(Typed::Str(s.clone())),
            Value::String(_, s) => Err(format!("{s:?} is not one of {}", choices.join(", "))),
            _ => Err(format!(
                "expected one of {}, found {}",
                choices.join(", "),
                found()
            )),
        },
        Ty::Device => match v {
            Value::String(_, s) => sd::device::parse_name(s).map(|_| Typed::Str(s.clone())),
            _ => Err(format!("expected cpu, cuda or cuda:N, found {}", found())),
        },
        Ty::Path(_) => match v {
            Value::String(_, s) if !s.is_empty() => Ok(Typed::Path(resolve(origin.base_dir(), s))),
            _ => Err(format!("expected a file name, found {}", found())),
        },
    }
}

fn check_path(p: &Path, role: PathRole) -> Result<(), String> {
    // something is there: a FIFO, device, folder or symlink loop is named for what it is
    // (a FIFO would block the first read forever)
    if p.symlink_metadata().is_ok() {
        use sd_plugins_api::input_file;
        match role {
            PathRole::File => return input_file::check(p).map(drop),
            PathRole::FileOrDir => return input_file::check_file_or_folder(p).map(drop),
            _ => {}
        }
    }
    let ok = match role {
        PathRole::File => p.is_file(),
        PathRole::Dir => p.is_dir(),
        PathRole::FileOrDir => p.exists(),
        PathRole::Output => {
            let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
            if let Some(d) = parent.filter(|d| !d.is_dir()) {
                return Err(format!(
                    "{}: folder {} does not exist",
                    p.display(),
                    d.display()
                ));
            }
            // never over a FIFO, device or folder (the output is renamed over its target)
            sd::output::check_output_target(p)?;
            true
        }
    };
    if ok {
        return Ok(());
    }
    Err(match role {
        PathRole::Dir => format!("no such folder: {}", p.display()),
        PathRole::FileOrDir => format!("not found: {}", p.display()),
        _ => format!("no such file: {}", p.display()),
    })
}

fn unknown_key(key: &str, known: &[&str]) -> String {
    match sd_plugins_api::params::closest(key, known) {
        Some(c) => format!("unknown key (did you mean `{c}`?)"),
        None => format!("unknown key (known keys: {})", known.join(", ")),
    }
}

/// Walks one table (top level or a list entry) against its fields.
pub struct Table<'a> {
    pub fig: &'a Figment,
    /// The `--from-png` image, for origins
    pub png: Option<&'a Path>,
    /// `""` for the top level, `control` / `lora` for list entries
    pub list: &'static str,
    /// Display index in the merged list, and index among entries of the same file.
    pub index: usize,
    pub file_index: usize,
    pub problems: &'a mut Vec<Problem>,
    pub shown: Vec<Shown>,
}

impl Table<'_> {
    pub fn key_name(&self, key: &str) -> String {
        if self.list.is_empty() {
            key.to_string()
        } else {
            format!("{}[{}].{key}", self.list, self.index)
        }
    }

    pub fn origin(&self, v: &Value, key: &str) -> Origin {
        let idx = self.file_index.to_string();
        let path: Vec<&str> = if self.list.is_empty() {
            vec![key]
        } else {
            vec![self.list, &idx, key]
        };
        let mut o = origin_of(self.fig, v.tag(), &path, self.png);
        if let (Origin::Flag(_), false) = (&o, self.list.is_empty()) {
            // the flag of a list: --control, --lora, --plugin
            let flag = self.list.trim_end_matches('s');
            o = Origin::Flag(format!("--{flag} #{}", self.file_index + 1));
        }
        o
    }

    pub fn problem(&mut self, origin: &Origin, key: &str, msg: impl Into<String>) {
        let k = self.key_name(key);
        self.problems.push(Problem::at(origin, k, msg));
    }

    /// Type-check every field present in `dict`; unknown keys are problems.
    pub fn walk(
        &mut self,
        dict: &Dict,
        fields: &[Field],
        extra_known: &[&str],
    ) -> Vec<(String, Typed)> {
        let mut known: Vec<&str> = fields.iter().map(|f| f.key).collect();
        known.extend(extra_known);
        let mut out = Vec::new();
        for (k, v) in dict {
            let origin = self.origin(v, k);
            if let Some(f) = fields.iter().find(|f| f.key == k) {
                let r = if f.key == "preprocessor" {
                    preprocessor(v, &origin)
                } else {
                    typed(v, f.ty, &origin)
                };
                // a model named by Hugging Face repo id: the local cache, or a download
                let r = match (r, v) {
                    (Ok(Typed::Path(p)), Value::String(_, raw))
                        if f.ty == Ty::Path(PathRole::FileOrDir)
                            && !p.exists()
                            && sd::hub::looks_like_repo_id(raw) =>
                    {
                        sd::hub::resolve(raw).map(Typed::Path)
                    }
                    (r, _) => r,
                };
                match r {
                    Ok(t) => {
                        if let (Typed::Path(p), Ty::Path(role)) = (&t, f.ty) {
                            if let Err(m) = check_path(p, role) {
                                self.problem(&origin, k, m);
                            }
                        }
                        self.shown.push(Shown {
                            key: k.clone(),
                            value: t.clone(),
                            origin,
                        });
                        out.push((k.clone(), t));
                    }
                    Err(m) => self.problem(&origin, k, m),
                }
            } else if !extra_known.contains(&k.as_str()) {
                let m = unknown_key(k, &known);
                self.problem(&origin, k, m);
            }
        }
        // list entries show their defaults too (top-level defaults come from the default layer)
        if !self.list.is_empty() {
            for f in fields.iter().filter(|f| !dict.contains_key(f.key)) {
                let value = match f.default {
                    schema::Default::None => continue,
                    schema::Default::Str(s) if f.key == "preprocessor" => {
                        Typed::Preprocessor(PreprocessorChoice::named(s))
                    }
                    schema::Default::Str(s) => Typed::Str(s.into()),
                    schema::Default::Int(i) => Typed::Int(i),
                    schema::Default::Float(x) => Typed::Float(x),
                    schema::Default::Bool(b) => Typed::Bool(b),
                };
                self.shown.push(Shown {
                    key: f.key.into(),
                    value,
                    origin: Origin::Default,
                });
            }
        }
        // schema order for display
        self.shown
            .sort_by_key(|s| fields.iter().position(|f| f.key == s.key));
        out
    }

    pub fn shown_origin(&self, key: &str) -> Option<Origin> {
        self.shown
            .iter()
            .find(|s| s.key == key)
            .map(|s| s.origin.clone())
    }
}

/// `preprocessor = "name"` or `preprocessor = { name = "...", PARAM = VALUE }`.
fn preprocessor(v: &Value, origin: &Origin) -> Result<Typed, String> {
    match v {
        Value::String(_, s) => Ok(Typed::Preprocessor(PreprocessorChoice::named(s))),
        Value::Dict(_, d) => {
            let name = match d.get("name") {
                Some(Value::String(_, s)) => s.clone(),
                Some(other) => {
                    return Err(format!(
                        "name: expected a string, found {}",
                        describe(other)
                    ))
                }
                None => return Err("a preprocessor table needs `name`".into()),
            };
            let mut params = Vec::new();
            for (k, v) in d.iter().filter(|(k, _)| k.as_str() != "name") {
                let pv = match v {
                    Value::Bool(_, b) => ParamValue::Bool(*b),
                    Value::String(_, s) => ParamValue::Str(s.clone()),
                    Value::Num(_, n) => match num_int(*n) {
                        Some(i) => ParamValue::Int(i),
                        None => ParamValue::Float(num_f64(*n)),
                    },
                    other => {
                        return Err(format!(
                            "{k}: expected a number, string or boolean, found {}",
                            describe(other)
                        ))
                    }
                };
                params.push((k.clone(), pv));
            }
            let _ = origin;
            Ok(Typed::Preprocessor(PreprocessorChoice { name, params }))
        }
        _ => Err(format!("expected a name or a table, found {}", describe(v))),
    }
}

pub fn get<'a>(vals: &'a [(String, Typed)], key: &str) -> Option<&'a Typed> {
    vals.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}
pub fn get_str(vals: &[(String, Typed)], key: &str) -> Option<String> {
    match get(vals, key)? {
        Typed::Str(s) => Some(s.clone()),
        _ => None,
    }
}
pub fn get_int(vals: &[(String, Typed)], key: &str) -> Option<i64> {
    match get(vals, key)? {
        Typed::Int(i) => Some(*i),
        _ => None,
    }
}
pub fn get_float(vals: &[(String, Typed)], key: &str) -> Option<f64> {
    match get(vals, key)? {
        Typed::Float(x) => Some(*x),
        Typed::Int(i) => Some(*i as f64),
        _ => None,
    }
}
pub fn get_bool(vals: &[(String, Typed)], key: &str) -> Option<bool> {
    match get(vals, key)? {
        Typed::Bool(b) => Some(*b),
        _ => None,
    }
}
pub fn get_path(vals: &[(String, Typed)], key: &str) -> Option<PathBuf> {
    match get(vals, key)? {
        Typed::Path(p) => Some(p.clone()),
        _ => None,
    }
}

/// Entries of a list (`control`, `lora`) in merged order, each with its index among the
/// entries of the same file (for line numbers).
pub fn list_entries<'a>(root: &'a Dict, key: &str) -> Vec<(&'a Value, usize)> {
    let Some(v) = root.get(key) else {
        return Vec::new();
    };
    let items: Vec<&Value> = match v {
        Value::Array(_, items) => items.iter().collect(),
        other => vec![other],
    };
    // entries of one layer share its tag: count per tag (linear in the number of entries)
    let mut seen: std::collections::HashMap<figment::value::Tag, usize> =
        std::collections::HashMap::new();
    items
        .into_iter()
        .map(|it| {
            let n = seen.entry(it.tag()).or_insert(0);
            *n += 1;
            (it, *n - 1)
        })
        .collect()
}
