//! From merged values to typed, validated settings. Every problem is collected, none stops
//! the walk, so one run reports them all.

use std::path::{Path, PathBuf};

use figment::value::{Dict, Num, Value};
use figment::Figment;
use sd_controlnet::spec::PreprocessorChoice;
use sd_controlnet::UnitSpec;
use sd_pipeline::samplers::{SamplerKind, Schedule};
use sd_plugins_api::{ParamValue, Registry};

use super::fields::{
    self, Field, PathRole, Ty, CONTROL_FIELDS, CONTROL_WEIGHT_RANGE, FIELDS, LORA_FIELDS,
    LORA_WEIGHT_RANGE,
};
use super::plugins::PluginEntry;
use super::sources::{describe, origin_of, Origin};
use super::{resolve, Problem, Problems};

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

#[derive(Debug, Clone)]
pub struct ControlEntry {
    pub id: Option<String>,
    pub spec: UnitSpec,
    pub shown: Vec<Shown>,
}

#[derive(Debug, Clone)]
pub struct LoraEntry {
    pub id: Option<String>,
    pub spec: sd_lora::LoraSpec,
    pub shown: Vec<Shown>,
}

/// The validated settings.
#[derive(Clone)]
pub struct Settings {
    pub model: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: SamplerKind,
    pub schedule: Schedule,
    pub seed: Option<u64>,
    pub rng: String,
    pub batch: usize,
    pub clip_skip: usize,
    pub init_image: Option<PathBuf>,
    pub strength: Option<f64>,
    pub mask: Option<PathBuf>,
    pub noise: Option<PathBuf>,
    pub save_latents: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub device: String,
    pub dtype: String,
    pub lora_dir: Option<PathBuf>,
    pub strict_lora: bool,
    pub control: Vec<ControlEntry>,
    pub lora: Vec<LoraEntry>,
    /// Hook plugins to run, with their parameters.
    pub plugins: Vec<PluginEntry>,
    /// Built-in preprocessors and every loaded plugin.
    pub registry: Registry,
    /// Top-level values in schema order, for `config show`.
    pub shown: Vec<Shown>,
}

impl Settings {
    /// What `generate` needs beyond valid values: a model and an output file.
    pub fn require_for_generate(&self) -> Result<(), Problems> {
        // no model: the embedded tiny-fill model, in builds that carry it (`embedded.rs`)
        let mut p = Vec::new();
        if self.model.is_none() && !crate::embedded::AVAILABLE {
            p.push(Problem::bare(
                "model",
                "missing: give --model, `model = ...` in a config file, or SDCTL_MODEL",
            ));
        }
        if self.output.is_none() {
            p.push(Problem::bare(
                "output",
                "missing: give --output, `output = ...` in a config file, or SDCTL_OUTPUT",
            ));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(Problems(p))
        }
    }
}

/// An integer-typed number (any width, signed or not) as i64.
pub fn num_int(n: Num) -> Option<i64> {
    n.to_i128()
        .or_else(|| n.to_u128().and_then(|u| i128::try_from(u).ok()))
        .and_then(|i| i64::try_from(i).ok())
}

/// Any number as f64.
pub fn num_f64(n: Num) -> f64 {
    n.to_f64()
        .or_else(|| n.to_i128().map(|i| i as f64))
        .or_else(|| n.to_u128().map(|u| u as f64))
        .unwrap_or(f64::NAN)
}

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
            if !x.is_finite() || x < min || x > max {
                return Err(format!("{x} is out of range {min}..={max}"));
            }
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
        Ty::Path(_) => match v {
            Value::String(_, s) if !s.is_empty() => Ok(Typed::Path(resolve(origin.base_dir(), s))),
            _ => Err(format!("expected a file name, found {}", found())),
        },
    }
}

fn check_path(p: &Path, role: PathRole) -> Result<(), String> {
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
pub(super) struct Table<'a> {
    pub(super) fig: &'a Figment,
    /// The `--from-png` image, for origins
    pub(super) png: Option<&'a Path>,
    /// `""` for the top level, `control` / `lora` for list entries
    pub(super) list: &'static str,
    /// Display index in the merged list, and index among entries of the same file.
    pub(super) index: usize,
    pub(super) file_index: usize,
    pub(super) problems: &'a mut Vec<Problem>,
    pub(super) shown: Vec<Shown>,
}

impl Table<'_> {
    pub(super) fn key_name(&self, key: &str) -> String {
        if self.list.is_empty() {
            key.to_string()
        } else {
            format!("{}[{}].{key}", self.list, self.index)
        }
    }

    pub(super) fn origin(&self, v: &Value, key: &str) -> Origin {
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

    pub(super) fn problem(&mut self, origin: &Origin, key: &str, msg: impl Into<String>) {
        let k = self.key_name(key);
        self.problems.push(Problem::at(origin, k, msg));
    }

    /// Type-check every field present in `dict`; unknown keys are problems.
    pub(super) fn walk(
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
                            && crate::hub::looks_like_repo_id(raw) =>
                    {
                        crate::hub::resolve(raw).map(Typed::Path)
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
                    fields::Default::None => continue,
                    fields::Default::Str(s) if f.key == "preprocessor" => {
                        Typed::Preprocessor(PreprocessorChoice::named(s))
                    }
                    fields::Default::Str(s) => Typed::Str(s.into()),
                    fields::Default::Int(i) => Typed::Int(i),
                    fields::Default::Float(x) => Typed::Float(x),
                    fields::Default::Bool(b) => Typed::Bool(b),
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

    pub(super) fn shown_origin(&self, key: &str) -> Option<Origin> {
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

pub(super) fn get<'a>(vals: &'a [(String, Typed)], key: &str) -> Option<&'a Typed> {
    vals.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}
pub(super) fn get_str(vals: &[(String, Typed)], key: &str) -> Option<String> {
    match get(vals, key)? {
        Typed::Str(s) => Some(s.clone()),
        _ => None,
    }
}
fn get_int(vals: &[(String, Typed)], key: &str) -> Option<i64> {
    match get(vals, key)? {
        Typed::Int(i) => Some(*i),
        _ => None,
    }
}
fn get_float(vals: &[(String, Typed)], key: &str) -> Option<f64> {
    match get(vals, key)? {
        Typed::Float(x) => Some(*x),
        Typed::Int(i) => Some(*i as f64),
        _ => None,
    }
}
fn get_bool(vals: &[(String, Typed)], key: &str) -> Option<bool> {
    match get(vals, key)? {
        Typed::Bool(b) => Some(*b),
        _ => None,
    }
}
pub(super) fn get_path(vals: &[(String, Typed)], key: &str) -> Option<PathBuf> {
    match get(vals, key)? {
        Typed::Path(p) => Some(p.clone()),
        _ => None,
    }
}

/// Entries of a list (`control`, `lora`) in merged order, each with its index among the
/// entries of the same file (for line numbers).
pub(super) fn list_entries<'a>(
    fig: &Figment,
    root: &'a Dict,
    key: &str,
) -> Vec<(&'a Value, usize)> {
    let Some(v) = root.get(key) else {
        return Vec::new();
    };
    let items: Vec<&Value> = match v {
        Value::Array(_, items) => items.iter().collect(),
        other => vec![other],
    };
    let mut seen: Vec<Option<figment::Metadata>> = Vec::new();
    items
        .into_iter()
        .map(|it| {
            let md = fig.get_metadata(it.tag()).cloned();
            let n = seen.iter().filter(|m| **m == md).count();
            seen.push(md);
            (it, n)
        })
        .collect()
}

/// Validate the merged figment into settings.
pub fn check(
    fig: &Figment,
    png: Option<&Path>,
    mut registry: Registry,
) -> Result<Settings, Problems> {
    let mut problems = Vec::new();
    let root: Dict = match figment::Provider::data(fig) {
        Ok(mut m) => m.remove(&figment::Profile::Default).unwrap_or_default(),
        Err(e) => {
            return Err(Problems(vec![Problem::bare("", e.to_string())]));
        }
    };
    let mut top = Table {
        fig,
        png,
        list: "",
        index: 0,
        file_index: 0,
        problems: &mut problems,
        shown: Vec::new(),
    };
    let mut extra: Vec<&str> = fields::LIST_KEYS.to_vec();
    extra.push(fields::INCLUDE_KEY);
    let vals = top.walk(&root, FIELDS, &extra);
    let allow_extreme = get_bool(&vals, "allow_extreme_weights").unwrap_or(false);

    // cross-field checks on the top level
    for key in ["width", "height"] {
        if let Some(v) = get_int(&vals, key).filter(|v| v % 8 != 0) {
            let o = top.shown_origin(key).unwrap_or(Origin::Default);
            top.problem(&o, key, format!("{v} is not a multiple of 8"));
        }
    }
    let strength = get_float(&vals, "strength");
    if let Some(s) = strength {
        let o = top.shown_origin("strength").unwrap_or(Origin::Default);
        if s <= 0.0 {
            top.problem(&o, "strength", "must be above 0 (0 would change nothing)");
        }
        if get(&vals, "init_image").is_none() {
            top.problem(
                &o,
                "strength",
                "needs init_image (strength is for img2img and inpainting)",
            );
        }
    }
    if get(&vals, "mask").is_some() && get(&vals, "init_image").is_none() {
        let o = top.shown_origin("mask").unwrap_or(Origin::Default);
        top.problem(&o, "mask", "needs init_image (the image to inpaint)");
    }
    let sampler_name = get_str(&vals, "sampler").unwrap_or_else(|| "dpmpp_2m".into());
    let (sampler, implied) = match SamplerKind::parse_alias(&sampler_name) {
        Ok(s) => s,
        Err(e) => {
            let o = top.shown_origin("sampler").unwrap_or(Origin::Default);
            top.problem(&o, "sampler", e.to_string());
            (SamplerKind::DpmPP2M, None)
        }
    };
    let schedule = match get_str(&vals, "schedule") {
        Some(s) => s.parse().unwrap_or(Schedule::Karras),
        None => implied.unwrap_or(Schedule::Karras),
    };
    let shown = std::mem::take(&mut top.shown);

    // plugins first: their preprocessors may be named by control units
    let plugins = super::plugins::check_plugins(
        fig,
        png,
        &root,
        get_path(&vals, "plugin_dir"),
        &mut registry,
        &mut problems,
    );

    // [[control]]: concatenated across files; an id replaces the earlier unit with that id
    let mut control: Vec<ControlEntry> = Vec::new();
    for (i, (v, file_index)) in list_entries(fig, &root, "control").into_iter().enumerate() {
        let mut t = Table {
            fig,
            png,
            list: "control",
            index: i,
            file_index,
            problems: &mut problems,
            shown: Vec::new(),
        };
        let Value::Dict(_, d) = v else {
            let o = t.origin(v, "");
            t.problem(&o, "", format!("expected a table, found {}", describe(v)));
            continue;
        };
        let vals = t.walk(d, CONTROL_FIELDS, &[]);
        let unit_origin = t.origin(v, "");
        let mut spec = UnitSpec::new(PathBuf::new(), PathBuf::new());
        for (key, slot) in [("model", &mut spec.model), ("image", &mut spec.image)] {
            match get_path(&vals, key) {
                Some(p) => *slot = p,
                None if d.contains_key(key) => {}
                // without a base model the embedded one is used, with its own ControlNet
                None if key == "model"
                    && crate::embedded::AVAILABLE
                    && fig.find_value("model").is_err() =>
                {
                    match crate::embedded::controlnet_dir() {
                        Ok(p) => *slot = p,
                        Err(e) => t.problem(&unit_origin, key, e.to_string()),
                    }
                }
                None => t.problem(
                    &unit_origin,
                    key,
                    format!("missing: every control unit needs `{key}`"),
                ),
            }
        }
        spec.mask = get_path(&vals, "mask");
        spec.weight = get_float(&vals, "weight").unwrap_or(1.0);
        spec.start = get_float(&vals, "start").unwrap_or(0.0);
        spec.end = get_float(&vals, "end").unwrap_or(1.0);
        if let Some(m) = get_str(&vals, "mode") {
            spec.mode = m.parse().unwrap_or(spec.mode);
        }
        if let Some(r) = get_str(&vals, "resize") {
            spec.resize = r.parse().unwrap_or(spec.resize);
        }
        if spec.start > spec.end {
            let o = t.shown_origin("start").unwrap_or(unit_origin.clone());
            t.problem(
                &o,
                "start",
                format!("start {} is after end {}", spec.start, spec.end),
            );
        }
        let (lo, hi) = CONTROL_WEIGHT_RANGE;
        if !allow_extreme && !(lo..=hi).contains(&spec.weight) {
            let o = t.shown_origin("weight").unwrap_or(unit_origin.clone());
            t.problem(
                &o,
                "weight",
                format!(
                    "{} is outside [{lo}, {hi}] (allow it with --allow-extreme-weights)",
                    spec.weight
                ),
            );
        }
        if let Some(Typed::Preprocessor(p)) = get(&vals, "preprocessor") {
            if let Err(errs) = p.resolve(&registry) {
                let o = t
                    .shown_origin("preprocessor")
                    .unwrap_or(unit_origin.clone());
                for e in errs {
                    t.problem(&o, "preprocessor", e);
                }
            }
            spec.preprocessor = Some(p.clone());
        }
        let id = get_str(&vals, "id");
        let entry = ControlEntry {
            id: id.clone(),
            spec,
            shown: std::mem::take(&mut t.shown),
        };
        match control.iter_mut().find(|c| id.is_some() && c.id == id) {
            Some(earlier) => *earlier = entry,
            None => control.push(entry),
        }
    }

    // [[lora]]: the same rules
    let mut lora: Vec<LoraEntry> = Vec::new();
    for (i, (v, file_index)) in list_entries(fig, &root, "lora").into_iter().enumerate() {
        let mut t = Table {
            fig,
            png,
            list: "lora",
            index: i,
            file_index,
            problems: &mut problems,
            shown: Vec::new(),
        };
        let Value::Dict(_, d) = v else {
            let o = t.origin(v, "");
            t.problem(&o, "", format!("expected a table, found {}", describe(v)));
            continue;
        };
        let vals = t.walk(d, LORA_FIELDS, &[]);
        let entry_origin = t.origin(v, "");
        let path = get_path(&vals, "path");
        if path.is_none() && !d.contains_key("path") {
            t.problem(
                &entry_origin,
                "path",
                "missing: every [[lora]] needs `path`",
            );
        }
        let w = get_float(&vals, "weight").unwrap_or(1.0);
        let spec = sd_lora::LoraSpec {
            path: path.unwrap_or_default(),
            unet_weight: get_float(&vals, "unet_weight").unwrap_or(w),
            te_weight: get_float(&vals, "te_weight").unwrap_or(w),
        };
        let (lo, hi) = LORA_WEIGHT_RANGE;
        for key in ["weight", "unet_weight", "te_weight"] {
            if let Some(x) =
                get_float(&vals, key).filter(|x| !allow_extreme && !(lo..=hi).contains(x))
            {
                let o = t.shown_origin(key).unwrap_or(entry_origin.clone());
                t.problem(
                    &o,
                    key,
                    format!("{x} is outside [{lo}, {hi}] (allow it with --allow-extreme-weights)"),
                );
            }
        }
        let id = get_str(&vals, "id");
        let entry = LoraEntry {
            id: id.clone(),
            spec,
            shown: std::mem::take(&mut t.shown),
        };
        match lora.iter_mut().find(|c| id.is_some() && c.id == id) {
            Some(earlier) => *earlier = entry,
            None => lora.push(entry),
        }
    }

    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    let usize_of = |k: &str| get_int(&vals, k).map(|i| i as usize);
    Ok(Settings {
        model: get_path(&vals, "model"),
        vae: get_path(&vals, "vae"),
        prompt: get_str(&vals, "prompt").unwrap_or_default(),
        negative_prompt: get_str(&vals, "negative_prompt").unwrap_or_default(),
        width: usize_of("width"),
        height: usize_of("height"),
        steps: usize_of("steps").unwrap_or(20),
        cfg_scale: get_float(&vals, "cfg_scale").unwrap_or(7.5),
        sampler,
        schedule,
        seed: get_int(&vals, "seed").map(|s| s as u64),
        rng: get_str(&vals, "rng").unwrap_or_else(|| "torch-cpu".into()),
        batch: usize_of("batch").unwrap_or(1),
        clip_skip: usize_of("clip_skip").unwrap_or(1),
        init_image: get_path(&vals, "init_image"),
        strength,
        mask: get_path(&vals, "mask"),
        noise: get_path(&vals, "noise"),
        save_latents: get_path(&vals, "save_latents"),
        output: get_path(&vals, "output"),
        device: get_str(&vals, "device").unwrap_or_else(|| "cpu".into()),
        dtype: get_str(&vals, "dtype").unwrap_or_else(|| "f32".into()),
        lora_dir: get_path(&vals, "lora_dir"),
        strict_lora: get_bool(&vals, "strict_lora").unwrap_or(false),
        control,
        lora,
        plugins,
        registry,
        shown,
    })
}
