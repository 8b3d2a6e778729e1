use std::path::PathBuf;

use thiserror::Error;

/// Errors of the Stable Diffusion core. Each names the file, key, tensor or value at fault.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// A config file holds a value we cannot use.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// Weights could not be loaded: a missing tensor, a wrong shape, a damaged file.
    #[error("{path}: {source}")]
    Weights {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("image {path}: {message}")]
    Image { path: PathBuf, message: String },
    /// A generation parameter out of range or inconsistent with the model.
    #[error("{0}")]
    Invalid(String),
    /// NaN or infinity appeared while generating; `at` says where ("the latents after step 3
    /// of 20"). The caller, who knows the files and settings, finds the culprit.
    #[error("{at} hold NaN or infinity")]
    NonFinite { at: String },
    #[error(transparent)]
    Sampler(Box<crate::samplers::SamplerError>),
    #[error(transparent)]
    Hook(#[from] sd_plugins_api::HookError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<crate::samplers::SamplerError> for Error {
    fn from(e: crate::samplers::SamplerError) -> Self {
        Error::Sampler(Box::new(e))
    }
}

/// A weight file that could not be read, as the loaders report it: a malformed header or
/// pickle is a [`Error::Config`] problem of the file, a tensor candle could not read
/// [`Error::Weights`]; the message (file, tensor, what was expected) is `sd-weights`' own.
impl From<sd_weights::Error> for Error {
    fn from(e: sd_weights::Error) -> Self {
        match e {
            sd_weights::Error::Io { path, source } => Error::Io { path, source },
            sd_weights::Error::Safetensors { path, source } => Error::Config {
                path,
                message: format!("not a safetensors file: {source}"),
            },
            sd_weights::Error::Pickle { path, message }
            | sd_weights::Error::Format { path, message } => Error::Config { path, message },
            sd_weights::Error::Tensor { path, source } => Error::Weights { path, source },
        }
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Read and parse a JSON config file into `T`, with the path in every error: a regular file,
/// bounded in size and nesting (`sd_plugins_api::config_text`), holding an object.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = read_config_text(path)?;
    let json = |source| Error::Json {
        path: path.to_path_buf(),
        source,
    };
    // serde reads a struct from a list too (`[]`: every key absent): only an object is a config
    let value: serde_json::Value = serde_json::from_str(&text).map_err(json)?;
    if !value.is_object() {
        return Err(Error::config(
            path,
            format!(
                "expected a JSON object {{\"key\": value, ...}}, found {}",
                json_kind(&value)
            ),
        ));
    }
    serde_json::from_str(&text).map_err(json)
}

/// A config file's text (see [`read_json`]); a missing file is an I/O error as before.
pub(crate) fn read_config_text(path: &std::path::Path) -> Result<String> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(Error::io(path, e));
    }
    sd_plugins_api::config_text::read_config(path)
        .map_err(|m| Error::config(path, sd_plugins_api::config_text::without_path(path, &m)))
}

/// What a JSON value is, in words.
pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list [...]",
        serde_json::Value::Object(_) => "an object",
    }
}
