use std::path::{Path, PathBuf};

use thiserror::Error;

/// A weight file that could not be read. Every variant names the file.
#[derive(Debug, Error)]
pub enum Error {
    /// The file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file's safetensors header is malformed (too short, too large, not JSON, offsets
    /// that do not cover the file...).
    #[error("{path}: not a safetensors file: {source}")]
    Safetensors {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    /// A `.ckpt` / `.pth` that is not a readable PyTorch zip archive, holds an unreadable
    /// pickle, or names a class outside the allow-list of tensor and container types.
    #[error("{path}: {message}")]
    Pickle { path: PathBuf, message: String },
    /// The file is not a weight file we read: what its first bytes say it is instead.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A tensor of the file could not be read (candle's error names the tensor).
    #[error("{path}: {source}")]
    Tensor {
        path: PathBuf,
        source: candle_core::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The file at fault.
    pub fn path(&self) -> &Path {
        match self {
            Error::Io { path, .. }
            | Error::Safetensors { path, .. }
            | Error::Pickle { path, .. }
            | Error::Format { path, .. }
            | Error::Tensor { path, .. } => path,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn pickle(path: &Path, message: String) -> Self {
        Error::Pickle {
            path: path.to_path_buf(),
            message,
        }
    }
}
