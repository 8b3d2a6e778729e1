use std::path::PathBuf;

use thiserror::Error;

/// LoRA errors; each names the file and key at fault.
#[derive(Debug, Error)]
pub enum LoraError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Pipeline(Box<sd_pipeline::Error>),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl From<sd_pipeline::Error> for LoraError {
    fn from(e: sd_pipeline::Error) -> Self {
        LoraError::Pipeline(Box::new(e))
    }
}

impl LoraError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        LoraError::File {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = LoraError> = std::result::Result<T, E>;
