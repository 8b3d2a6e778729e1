//! Contracts between the denoising loop in `sd-pipeline` and everything that extends it.
//!
//! The core loop knows nothing about ControlNet, LoRA or previews: they reach it only
//! through the [`Hook`] trait (called at fixed points of every generation) and the
//! [`WeightPatch`] trait (applied while weights are loaded). See `docs/design.md`.

mod error;
mod hooks;
mod patch;

pub use error::HookError;
pub use hooks::{
    classifier_free_guidance, Conditioning, Hook, HookSet, NoiseLevels, NoisePrediction,
    ResidualInput, Residuals, StepInfo,
};
pub use patch::{ModelPart, WeightPatch};
