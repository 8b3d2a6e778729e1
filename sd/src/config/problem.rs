//! A problem with the settings, where its value came from, and how paths in files resolve.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Default,
    File { path: PathBuf, line: Option<usize> },
    Env(String),
    Flag(String),
    Png(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "default"),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::File {
                path,
                line: Some(l),
            } => write!(f, "{}:{l}", path.display()),
            Origin::Env(v) => write!(f, "env {v}"),
            Origin::Flag(v) => write!(f, "flag {v}"),
            Origin::Png(p) => write!(f, "png {}", p.display()),
        }
    }
}

impl Origin {
    /// The folder relative paths are resolved against: the config file's, else none (cwd).
    pub fn base_dir(&self) -> Option<&Path> {
        match self {
            Origin::File { path, .. } => path.parent(),
            _ => None,
        }
    }
}

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
    pub fn order(&self) -> (u8, String, usize) {
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
