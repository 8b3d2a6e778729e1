//! The error of sampler names and scheduler configs.

use thiserror::Error;

/// Errors of sampler names and scheduler configs; each names the file, key and value at fault.
#[derive(Debug, Error)]
pub enum SamplerError {
    /// `expected`: the valid names, comma-separated.
    #[error("unknown sampler {name:?}: expected one of {expected}")]
    UnknownSampler { name: String, expected: String },
    #[error("unknown schedule {name:?}: expected one of {expected}")]
    UnknownSchedule { name: String, expected: String },
    #[error("cannot read scheduler config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid JSON in scheduler config {path}: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    /// A key of a scheduler config holds a value we cannot use, e.g.
    /// `unknown beta_schedule "foo" in scheduler/scheduler_config.json (expected ...)`.
    /// A number out of range, or a file that is no config: `PATH: KEY: must be ...`.
    #[error("{path}: {}{message}", if key.is_empty() { String::new() } else { format!("{key}: ") })]
    Value {
        path: String,
        key: String,
        message: String,
    },
    #[error("{problem} {key} {value} in {path}{note}")]
    Config {
        path: String,
        key: String,
        value: String,
        /// "unknown", "unsupported" or "invalid".
        problem: &'static str,
        /// Empty or ` (...)` with what would be accepted.
        note: String,
    },
    /// A parameter out of range (steps).
    #[error("{0}")]
    Invalid(String),
}
