//! The training crate's error: what went wrong, naming the file, key or value at fault, with
//! the ControlNet, pipeline and tensor errors it wraps shown as they are.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Training and evaluation errors.
#[derive(Debug, Error)]
pub enum TrainError {
    /// A file or folder that cannot be read, written or used.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// A weight file that cannot be loaded or saved.
    #[error("{path}: {source}")]
    Weights {
        path: PathBuf,
        source: candle_core::Error,
    },
    /// A setting or value out of range.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Control(Box<sd_controlnet::ControlError>),
    #[error(transparent)]
    Pipeline(Box<sd_pipeline::Error>),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl TrainError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TrainError::File {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn weights(path: &Path, source: candle_core::Error) -> Self {
        TrainError::Weights {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl From<sd_controlnet::ControlError> for TrainError {
    fn from(e: sd_controlnet::ControlError) -> Self {
        TrainError::Control(Box::new(e))
    }
}

impl From<sd_pipeline::Error> for TrainError {
    fn from(e: sd_pipeline::Error) -> Self {
        TrainError::Pipeline(Box::new(e))
    }
}
