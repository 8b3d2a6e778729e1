use thiserror::Error;

/// Error raised by a hook or a weight patch. The pipeline reports it with the hook's name.
#[derive(Debug, Error)]
pub enum HookError {
    #[cfg(feature = "host")]
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("{hook}: {message}")]
    Failed { hook: String, message: String },
    /// Stop sampling here and keep the latents as they are (an interrupt: A1111's "Interrupt"
    /// still decodes and returns the image so far). Only `before_step` may return it.
    #[error("sampling stopped by {hook}")]
    Stop { hook: String },
}

impl HookError {
    pub fn failed(hook: impl Into<String>, message: impl Into<String>) -> Self {
        HookError::Failed {
            hook: hook.into(),
            message: message.into(),
        }
    }
}
