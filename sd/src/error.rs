//! The front door's error: the library errors it passes through unchanged (their messages and
//! causes are what a person reads), and messages that name the setting or file at fault.

/// What went wrong while loading or running a [`crate::Job`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A message naming the setting, file or value at fault.
    #[error("{0}")]
    Message(String),
    #[error(transparent)]
    Pipeline(#[from] sd_pipeline::Error),
    #[error(transparent)]
    Control(#[from] sd_controlnet::ControlError),
    #[error(transparent)]
    Lora(#[from] sd_lora::LoraError),
    #[error(transparent)]
    Hook(#[from] sd_plugins_api::HookError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl From<String> for Error {
    fn from(m: String) -> Self {
        Error::Message(m)
    }
}

impl From<&str> for Error {
    fn from(m: &str) -> Self {
        Error::Message(m.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
