//! One settings model for every subcommand that takes generation settings: layered from
//! defaults, `--config` files, `SDCTL_*` variables and flags, then validated as a whole
//! (every problem reported at once, each naming its file, line and key) before any model loads.

mod args;
mod check;
mod fields;
mod plugins;
mod show;
mod sources;

use std::fmt;
use std::path::{Path, PathBuf};

pub use args::SettingsArgs;
pub use check::Settings;
pub use show::render as show;
pub use sources::Origin;

/// One problem with the settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Where the offending value came from (file:line, env var, flag), if known.
    pub origin: Option<Origin>,
    /// `cfg_scale`, `control[1].weight`, ...
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn at(origin: &Origin, key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            origin: Some(origin.clone()),
            key: key.into(),
            message: message.into(),
        }
    }
    pub fn file(path: &Path, line: Option<usize>, key: &str, message: impl Into<String>) -> Self {
        Self {
            origin: Some(Origin::File {
                path: path.to_path_buf(),
                line,
            }),
            key: key.into(),
            message: message.into(),
        }
    }
    pub fn bare(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            origin: None,
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.origin {
            write!(f, "{o}: ")?;
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl Problem {
    /// Sort key: files (by name, then line), then environment, flags, the rest.
    fn order(&self) -> (u8, String, usize) {
        match &self.origin {
            Some(Origin::File { path, line }) => (0, path.display().to_string(), line.unwrap_or(0)),
            Some(Origin::Default) => (1, String::new(), 0),
            Some(Origin::Env(v)) => (2, v.clone(), 0),
            Some(Origin::Flag(v)) => (3, v.clone(), 0),
            Some(Origin::Png(p)) => (1, p.display().to_string(), 0),
            None => (4, String::new(), 0),
        }
    }
}

/// Every problem found, shown one per line.
#[derive(Debug)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} problem{} in the settings:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Resolve `p` against `base` (a config file's folder) unless it is absolute.
pub fn resolve(base: Option<&Path>, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p,
    }
}

/// Layer and validate the settings given on the command line.
pub fn load(args: &SettingsArgs) -> Result<Settings, Problems> {
    let mut problems = Vec::new();
    let files = sources::expand_includes(&args.config, &mut problems);
    let flags = args.to_dict(&mut problems);
    let png = args.from_png.as_deref().and_then(|p| {
        match crate::infotext::settings_from_png(p)
            .and_then(|m| figment::value::Value::serialize(m).map_err(|e| e.to_string()))
        {
            Ok(figment::value::Value::Dict(_, d)) => Some(d),
            Ok(_) => None,
            Err(e) => {
                problems.push(Problem::bare("--from-png", e));
                None
            }
        }
    });
    // unreadable files are reported and left out; the rest is still checked
    let fig = sources::compose(&files, png, flags);
    let mut registry = sd_preprocessors::registry();
    if let Some(d) = crate::hashes::cache_dir() {
        registry = registry.with_cache(sd_plugins_api::cache::PreprocessCache::new(
            d.join("preprocessed"),
        ));
    }
    match check::check(&fig, args.from_png.as_deref(), registry) {
        Ok(s) if problems.is_empty() => Ok(s),
        Ok(_) => Err(Problems(problems)),
        Err(Problems(more)) => {
            problems.extend(more);
            problems.sort_by_key(Problem::order);
            Err(Problems(problems))
        }
    }
}
