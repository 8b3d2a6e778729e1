use std::path::PathBuf;

use thiserror::Error;

/// ControlNet errors; each names the file, key or value at fault.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Weights {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pipeline(Box<sd_pipeline::Error>),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl ControlError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ControlError::File {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

impl From<sd_pipeline::Error> for ControlError {
    fn from(e: sd_pipeline::Error) -> Self {
        ControlError::Pipeline(Box::new(e))
    }
}
