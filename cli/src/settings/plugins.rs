//! `plugins = [...]`, `--plugin PATH[,PARAM=VALUE]...` and the plugin folder: plugins are
//! loaded while the settings are checked, so that their preprocessors can be named by control
//! units and their parameters checked against what they declare.

use std::path::PathBuf;
use std::sync::Arc;

use figment::value::{Dict, Value};
use figment::Figment;
use sd_plugins_api::dylib::host::{PluginKind, PluginLibrary};
use sd_plugins_api::{resolve_params, ParamKind, ParamValue, Params, Registry};

use crate::settings::table::{list_entries, Shown, Table, Typed};
use sd::config::problem::{resolve, Origin, Problem};
use sd::config::values::{describe, num_f64, num_int};

/// A hook plugin to run, with validated parameters.
#[derive(Clone)]
pub struct PluginEntry {
    pub id: Option<String>,
    pub lib: Arc<PluginLibrary>,
    pub params: Params,
    pub shown: Vec<Shown>,
}

impl std::fmt::Debug for PluginEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PluginEntry({}, {:?})",
            self.lib.manifest.name, self.params
        )
    }
}

/// A parameter value from a file keeps its type; from a flag it is text, read by the type
/// the plugin declared.
fn param_value(v: &Value, kind: Option<&ParamKind>, origin: &Origin) -> Result<ParamValue, String> {
    Ok(match v {
        Value::Bool(_, b) => ParamValue::Bool(*b),
        Value::Num(_, n) => match num_int(*n) {
            Some(i) => ParamValue::Int(i),
            None => ParamValue::Float(num_f64(*n)),
        },
        Value::String(_, s) if !matches!(origin, Origin::File { .. }) => {
            ParamValue::from_text(s, kind)
        }
        Value::String(_, s) => ParamValue::Str(s.clone()),
        other => {
            return Err(format!(
                "expected a number, string or boolean, found {}",
                describe(other)
            ))
        }
    })
}

fn typed(v: &ParamValue) -> Typed {
    match v {
        ParamValue::Bool(b) => Typed::Bool(*b),
        ParamValue::Int(i) => Typed::Int(*i),
        ParamValue::Float(x) => Typed::Float(*x),
        ParamValue::Str(s) => Typed::Str(s.clone()),
    }
}

/// Load the plugin folder and every `plugins` entry; hook plugins are returned to run.
pub fn check_plugins(
    fig: &Figment,
    png: Option<&std::path::Path>,
    root: &Dict,
    plugin_dir: Option<PathBuf>,
    registry: &mut Registry,
    problems: &mut Vec<Problem>,
) -> Vec<PluginEntry> {
    let dir = plugin_dir.or_else(|| sd::plugins::default_dir().filter(|d| d.is_dir()));
    if let Some(dir) = dir {
        // a broken plugin in the folder must not stop every run: it is reported and skipped
        for e in sd::plugins::load_folder(registry, &dir) {
            eprintln!("warning: {e} (skipped)");
        }
    }

    let mut out: Vec<PluginEntry> = Vec::new();
    for (i, (v, file_index)) in list_entries(root, "plugins").into_iter().enumerate() {
        let mut t = Table {
            fig,
            png,
            list: "plugins",
            index: i,
            file_index,
            problems,
            shown: Vec::new(),
        };
        let dict: Dict = match v {
            Value::String(tag, s) => {
                let mut d = Dict::new();
                d.insert("path".into(), Value::String(*tag, s.clone()));
                d
            }
            Value::Dict(_, d) => d.clone(),
            other => {
                let o = t.origin(other, "");
                t.problem(
                    &o,
                    "",
                    format!("expected a file name or a table, found {}", describe(other)),
                );
                continue;
            }
        };
        let entry_origin = t.origin(v, "");
        let lib = match (dict.get("path"), dict.get("name")) {
            (Some(Value::String(_, p)), None) => {
                let o = t.origin(&dict["path"], "path");
                let path = resolve(o.base_dir(), p);
                t.shown.push(Shown {
                    key: "path".into(),
                    value: Typed::Path(path.clone()),
                    origin: o.clone(),
                });
                match registry.load(&path) {
                    Ok(lib) => Some(lib),
                    Err(e) => {
                        t.problem(&o, "path", e);
                        None
                    }
                }
            }
            (None, Some(Value::String(_, n))) => {
                let o = t.origin(&dict["name"], "name");
                t.shown.push(Shown {
                    key: "name".into(),
                    value: Typed::Str(n.clone()),
                    origin: o.clone(),
                });
                match registry.libraries().iter().find(|l| &l.manifest.name == n) {
                    Some(l) => Some(l.clone()),
                    None => {
                        let loaded: Vec<&str> = registry
                            .libraries()
                            .iter()
                            .map(|l| l.manifest.name.as_str())
                            .collect();
                        t.problem(&o, "name", format!(
                            "no loaded plugin is named {n:?} (loaded: {}; give `path`, or put the plugin in the plugin folder)",
                            if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") }
                        ));
                        None
                    }
                }
            }
            (Some(_), Some(_)) => {
                t.problem(&entry_origin, "", "give `path` or `name`, not both");
                None
            }
            (p, n) => {
                let bad = p.or(n);
                let m = match bad {
                    Some(b) => format!("expected a string, found {}", describe(b)),
                    None => "missing: every plugin entry needs `path` (or `name` of a plugin in the plugin folder)".into(),
                };
                t.problem(&entry_origin, if p.is_some() { "path" } else { "name" }, m);
                None
            }
        };
        let id = match dict.get("id") {
            Some(v @ Value::String(_, s)) => {
                let o = t.origin(v, "id");
                t.shown.insert(
                    0,
                    Shown {
                        key: "id".into(),
                        value: Typed::Str(s.clone()),
                        origin: o,
                    },
                );
                Some(s.clone())
            }
            _ => None,
        };
        let Some(lib) = lib else { continue };
        let specs = &lib.manifest.params;
        let mut given = Vec::new();
        for (k, v) in dict
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "path" | "name" | "id"))
        {
            let o = t.origin(v, k);
            let kind = specs.iter().find(|s| &s.name == k).map(|s| &s.kind);
            match param_value(v, kind, &o) {
                Ok(pv) => {
                    t.shown.push(Shown {
                        key: k.clone(),
                        value: typed(&pv),
                        origin: o,
                    });
                    given.push((k.clone(), pv));
                }
                Err(m) => t.problem(&o, k, m),
            }
        }
        if lib.manifest.kind == PluginKind::Preprocessor {
            if let Some((k, _)) = given.first() {
                let o = t.origin(&dict[k.as_str()], k);
                t.problem(&o, k, format!(
                    "{} is a preprocessor plugin: its parameters go in a control unit's preprocessor table",
                    lib.manifest.name
                ));
            }
            continue;
        }
        let params = match resolve_params(specs, &given) {
            Ok(p) => p,
            Err(errs) => {
                for e in errs {
                    let o = dict
                        .get(&e.key)
                        .map(|v| t.origin(v, &e.key))
                        .unwrap_or(entry_origin.clone());
                    t.problem(
                        &o,
                        &e.key,
                        format!("plugin {}: {}", lib.manifest.name, e.message),
                    );
                }
                continue;
            }
        };
        let entry = PluginEntry {
            id: id.clone(),
            lib,
            params,
            shown: std::mem::take(&mut t.shown),
        };
        match out.iter_mut().find(|e| id.is_some() && e.id == id) {
            Some(earlier) => *earlier = entry,
            None => out.push(entry),
        }
    }
    out
}
