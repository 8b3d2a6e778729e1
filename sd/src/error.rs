//! The front door's error: the library errors it passes through unchanged (their messages and
//! causes are what a person reads), and messages that name the setting or file at fault.

/// What went wrong while loading or running a [`crate::Job`]. The library errors are boxed so
/// that a `Result` stays small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A message naming the setting, file or value at fault.
    #[error("{0}")]
    Message(String),
    #[error(transparent)]
    Pipeline(Box<sd_pipeline::Error>),
    #[error(transparent)]
    Control(Box<sd_controlnet::ControlError>),
    #[error(transparent)]
    Lora(Box<sd_lora::LoraError>),
    #[error(transparent)]
    Hook(Box<sd_plugins_api::HookError>),
    #[error(transparent)]
    Tensor(Box<candle_core::Error>),
}

macro_rules! boxed_from {
    ($($variant:ident: $ty:ty),* $(,)?) => {$(
        impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Error::$variant(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    Pipeline: sd_pipeline::Error,
    Control: sd_controlnet::ControlError,
    Lora: sd_lora::LoraError,
    Hook: sd_plugins_api::HookError,
    Tensor: candle_core::Error,
);

/// Weight-file errors read as sd-pipeline words them.
impl From<sd_weights::Error> for Error {
    fn from(e: sd_weights::Error) -> Self {
        sd_pipeline::Error::from(e).into()
    }
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
