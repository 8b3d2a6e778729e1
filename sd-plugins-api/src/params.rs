//! Parameter descriptions: what a preprocessor or plugin accepts (name, type, default, range,
//! help), so the CLI can list them and validate config values before anything runs.

use std::collections::BTreeMap;
use std::fmt;

/// A parameter value as given in a config file or on the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl ParamValue {
    /// A value given as text (a flag, an environment variable), read by the type the
    /// parameter declares; text that does not parse stays text, for `check` to refuse.
    pub fn from_text(text: &str, kind: Option<&ParamKind>) -> Self {
        let parsed = match kind {
            Some(ParamKind::Int { .. }) => text.parse().map(ParamValue::Int).ok(),
            Some(ParamKind::Float { .. }) => text.parse().map(ParamValue::Float).ok(),
            Some(ParamKind::Bool) => text.parse().map(ParamValue::Bool).ok(),
            _ => None,
        };
        parsed.unwrap_or_else(|| ParamValue::Str(text.to_string()))
    }

    /// The value as a config file would write it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            ParamValue::Bool(_) => "a boolean",
            ParamValue::Int(_) => "an integer",
            ParamValue::Float(_) => "a number",
            ParamValue::Str(_) => "a string",
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// The type and admissible values of a parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamKind {
    Bool,
    /// Inclusive range.
    Int {
        min: i64,
        max: i64,
    },
    /// Inclusive range.
    Float {
        min: f64,
        max: f64,
    },
    /// One of a fixed set of strings.
    Choice(Vec<String>),
    /// Any string (e.g. a file path).
    Str,
}

impl fmt::Display for ParamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamKind::Bool => write!(f, "bool"),
            ParamKind::Int { min, max } => write!(f, "int {min}..={max}"),
            ParamKind::Float { min, max } => write!(f, "float {min}..={max}"),
            ParamKind::Choice(c) => write!(f, "one of {}", c.join("|")),
            ParamKind::Str => write!(f, "string"),
        }
    }
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
    pub default: ParamValue,
    pub help: String,
}

impl ParamSpec {
    pub fn int(name: &str, default: i64, min: i64, max: i64, help: &str) -> Self {
        Self::new(
            name,
            ParamKind::Int { min, max },
            ParamValue::Int(default),
            help,
        )
    }
    pub fn float(name: &str, default: f64, min: f64, max: f64, help: &str) -> Self {
        Self::new(
            name,
            ParamKind::Float { min, max },
            ParamValue::Float(default),
            help,
        )
    }
    pub fn bool(name: &str, default: bool, help: &str) -> Self {
        Self::new(name, ParamKind::Bool, ParamValue::Bool(default), help)
    }
    pub fn choice(name: &str, default: &str, choices: &[&str], help: &str) -> Self {
        Self::new(
            name,
            ParamKind::Choice(choices.iter().map(|c| c.to_string()).collect()),
            ParamValue::Str(default.into()),
            help,
        )
    }
    pub fn string(name: &str, default: &str, help: &str) -> Self {
        Self::new(name, ParamKind::Str, ParamValue::Str(default.into()), help)
    }
    fn new(name: &str, kind: ParamKind, default: ParamValue, help: &str) -> Self {
        Self {
            name: name.into(),
            kind,
            default,
            help: help.into(),
        }
    }

    /// Check (and normalise) one given value against this description.
    pub fn check(&self, v: &ParamValue) -> Result<ParamValue, String> {
        let wrong = || {
            Err(format!(
                "expected {}, found {} {v}",
                self.kind,
                v.kind_name()
            ))
        };
        match (&self.kind, v) {
            (ParamKind::Bool, ParamValue::Bool(b)) => Ok(ParamValue::Bool(*b)),
            (ParamKind::Int { min, max }, ParamValue::Int(i)) => {
                if i < min || i > max {
                    Err(format!("{i} is out of range {min}..={max}"))
                } else {
                    Ok(ParamValue::Int(*i))
                }
            }
            (ParamKind::Int { .. }, ParamValue::Float(x)) if x.fract() == 0.0 => {
                self.check(&ParamValue::Int(*x as i64))
            }
            (ParamKind::Float { min, max }, ParamValue::Float(_) | ParamValue::Int(_)) => {
                let x = match v {
                    ParamValue::Float(x) => *x,
                    ParamValue::Int(i) => *i as f64,
                    _ => unreachable!(),
                };
                crate::number::Range::closed(*min, *max)
                    .check(x)
                    .map(ParamValue::Float)
            }
            (ParamKind::Choice(c), ParamValue::Str(s)) => {
                if c.iter().any(|x| x == s) {
                    Ok(v.clone())
                } else {
                    Err(format!("{s:?} is not one of {}", c.join(", ")))
                }
            }
            (ParamKind::Str, ParamValue::Str(_)) => Ok(v.clone()),
            _ => wrong(),
        }
    }
}

/// Parameter values after validation: every declared parameter present (given or default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(pub BTreeMap<String, ParamValue>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.0.get(name)
    }
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.0.get(name)? {
            ParamValue::Int(i) => Some(*i),
            _ => None,
        }
    }
    pub fn float(&self, name: &str) -> Option<f64> {
        match self.0.get(name)? {
            ParamValue::Float(x) => Some(*x),
            ParamValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.0.get(name)? {
            ParamValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.0.get(name)? {
            ParamValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A problem with one given parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Validate given values against declared parameters; every problem is reported, unknown
/// names with the closest declared name.
pub fn resolve_params(
    specs: &[ParamSpec],
    given: &[(String, ParamValue)],
) -> Result<Params, Vec<ParamError>> {
    let mut out: BTreeMap<String, ParamValue> = specs
        .iter()
        .map(|s| (s.name.clone(), s.default.clone()))
        .collect();
    let mut errors = Vec::new();
    for (k, v) in given {
        match specs.iter().find(|s| &s.name == k) {
            Some(spec) => match spec.check(v) {
                Ok(v) => {
                    out.insert(k.clone(), v);
                }
                Err(message) => errors.push(ParamError {
                    key: k.clone(),
                    message,
                }),
            },
            None => {
                let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                let message = match closest(k, &names) {
                    Some(c) => format!("unknown parameter (did you mean `{c}`?)"),
                    None if names.is_empty() => "unknown parameter (this takes none)".into(),
                    None => format!("unknown parameter (parameters: {})", names.join(", ")),
                };
                errors.push(ParamError {
                    key: k.clone(),
                    message,
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(Params(out))
    } else {
        Err(errors)
    }
}

/// The candidate nearest to `word` by edit distance, when it is plausibly a typo.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_read_by_the_declared_kind() {
        let int = ParamSpec::int("n", 1, 0, 9, "").kind;
        let float = ParamSpec::float("x", 1.0, 0.0, 9.0, "").kind;
        let boolean = ParamSpec::bool("b", false, "").kind;
        assert_eq!(ParamValue::from_text("3", Some(&int)), ParamValue::Int(3));
        assert_eq!(
            ParamValue::from_text("3", Some(&float)),
            ParamValue::Float(3.0)
        );
        assert_eq!(
            ParamValue::from_text("true", Some(&boolean)),
            ParamValue::Bool(true)
        );
        // unparsable text stays text (the range check names it), and so does an unknown key's
        assert_eq!(
            ParamValue::from_text("x3", Some(&int)),
            ParamValue::Str("x3".into())
        );
        assert_eq!(
            ParamValue::from_text("3", None),
            ParamValue::Str("3".into())
        );
    }

    fn specs() -> Vec<ParamSpec> {
        vec![
            ParamSpec::int("low", 100, 0, 255, "lower threshold"),
            ParamSpec::float("sigma", 1.0, 0.0, 10.0, "blur"),
            ParamSpec::choice("mode", "a", &["a", "b"], "mode"),
        ]
    }

    #[test]
    fn defaults_fill_in_and_values_are_checked() {
        let p = resolve_params(&specs(), &[("low".into(), ParamValue::Int(7))]).unwrap();
        assert_eq!(p.int("low"), Some(7));
        assert_eq!(p.float("sigma"), Some(1.0));
        assert_eq!(p.str("mode"), Some("a"));
        // an integer is a fine float
        let p = resolve_params(&specs(), &[("sigma".into(), ParamValue::Int(2))]).unwrap();
        assert_eq!(p.float("sigma"), Some(2.0));
    }

    #[test]
    fn every_error_is_reported() {
        let e = resolve_params(
            &specs(),
            &[
                ("low".into(), ParamValue::Int(300)),
                ("sigam".into(), ParamValue::Float(1.0)),
                ("mode".into(), ParamValue::Str("c".into())),
                ("sigma".into(), ParamValue::Str("x".into())),
            ],
        )
        .unwrap_err();
        let msgs: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 4, "{msgs:?}");
        assert!(msgs[0].contains("low: 300 is out of range 0..=255"));
        assert!(msgs[1].contains("did you mean `sigma`"));
        assert!(msgs[2].contains("\"c\" is not one of a, b"));
        assert!(msgs[3].contains("expected float"));
    }

    #[test]
    fn closest_finds_typos_only() {
        assert_eq!(
            closest("cfg_scle", &["cfg_scale", "steps"]),
            Some("cfg_scale")
        );
        assert_eq!(closest("zzzzzzzz", &["cfg_scale", "steps"]), None);
    }
}

/// Parameter declarations and values as JSON, the form they take across the plugin ABI.
pub mod json {
    use super::*;
    use serde_json::{json, Map, Value};

    pub fn spec_to_json(s: &ParamSpec) -> Value {
        let mut v = json!({ "name": s.name, "default": value_to_json(&s.default), "help": s.help });
        let m = v.as_object_mut().expect("object");
        match &s.kind {
            ParamKind::Bool => {
                m.insert("type".into(), "bool".into());
            }
            ParamKind::Int { min, max } => {
                m.insert("type".into(), "int".into());
                m.insert("min".into(), (*min).into());
                m.insert("max".into(), (*max).into());
            }
            ParamKind::Float { min, max } => {
                m.insert("type".into(), "float".into());
                m.insert("min".into(), (*min).into());
                m.insert("max".into(), (*max).into());
            }
            ParamKind::Choice(c) => {
                m.insert("type".into(), "choice".into());
                m.insert("choices".into(), c.clone().into());
            }
            ParamKind::Str => {
                m.insert("type".into(), "string".into());
            }
        }
        v
    }

    pub fn spec_from_json(v: &Value) -> Result<ParamSpec, String> {
        let name = v["name"].as_str().ok_or("parameter without a name")?;
        let err = |what: &str| format!("parameter {name}: {what}");
        let default = value_from_json(&v["default"]).ok_or_else(|| err("bad default"))?;
        let kind = match v["type"].as_str() {
            Some("bool") => ParamKind::Bool,
            Some("int") => ParamKind::Int {
                min: v["min"].as_i64().ok_or_else(|| err("int without min"))?,
                max: v["max"].as_i64().ok_or_else(|| err("int without max"))?,
            },
            Some("float") => ParamKind::Float {
                min: v["min"].as_f64().ok_or_else(|| err("float without min"))?,
                max: v["max"].as_f64().ok_or_else(|| err("float without max"))?,
            },
            Some("choice") => ParamKind::Choice(
                v["choices"]
                    .as_array()
                    .ok_or_else(|| err("choice without choices"))?
                    .iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect(),
            ),
            Some("string") => ParamKind::Str,
            other => return Err(err(&format!("unknown type {other:?}"))),
        };
        let spec = ParamSpec {
            name: name.into(),
            kind,
            default,
            help: v["help"].as_str().unwrap_or("").into(),
        };
        spec.check(&spec.default)
            .map_err(|e| err(&format!("default: {e}")))?;
        Ok(spec)
    }

    pub fn value_to_json(v: &ParamValue) -> Value {
        match v {
            ParamValue::Bool(b) => (*b).into(),
            ParamValue::Int(i) => (*i).into(),
            ParamValue::Float(x) => (*x).into(),
            ParamValue::Str(s) => s.clone().into(),
        }
    }

    pub fn value_from_json(v: &Value) -> Option<ParamValue> {
        Some(match v {
            Value::Bool(b) => ParamValue::Bool(*b),
            Value::Number(n) if n.is_i64() => ParamValue::Int(n.as_i64()?),
            Value::Number(n) => ParamValue::Float(n.as_f64()?),
            Value::String(s) => ParamValue::Str(s.clone()),
            _ => return None,
        })
    }

    pub fn params_to_json(p: &Params) -> String {
        let m: Map<String, Value> =
            p.0.iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect();
        Value::Object(m).to_string()
    }

    /// Parse a JSON object of values and validate it against `specs`.
    pub fn params_from_json(specs: &[ParamSpec], text: &str) -> Result<Params, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("parameters: {e}"))?;
        let obj = v.as_object().ok_or("parameters: not a JSON object")?;
        let given: Vec<(String, ParamValue)> = obj
            .iter()
            .map(|(k, v)| {
                value_from_json(v)
                    .map(|pv| (k.clone(), pv))
                    .ok_or_else(|| format!("parameter {k}: unsupported value {v}"))
            })
            .collect::<Result<_, _>>()?;
        resolve_params(specs, &given).map_err(|errs| {
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}
