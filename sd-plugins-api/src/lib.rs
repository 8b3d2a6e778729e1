//! Contracts between the denoising loop in `sd-pipeline` and everything that extends it.
//!
//! The crate's top-level modules are the contracts (hook points, weight patches, step
//! position, parameters, preprocessors and their registry); [`dylib`] holds the C ABI and
//! the loading of third-party plugin libraries built against it. Everything users need is
//! re-exported here at the root.
//!
//! The core loop knows nothing about ControlNet, LoRA or previews: they reach it only
//! through the [`Hook`] trait (called at fixed points of every generation) and the
//! [`WeightPatch`] trait (applied while weights are loaded). See `docs/design.md`.
//!
//! A hook overrides only the points it needs. This one lowers the guidance scale over the
//! schedule (a "dynamic CFG") by combining the predictions itself:
//!
//! ```
//! use candle_core::Tensor;
//! use sd_plugins_api::{Hook, HookError, HookSet, NoisePrediction, StepInfo};
//!
//! struct FadingCfg;
//!
//! impl Hook for FadingCfg {
//!     fn name(&self) -> &str {
//!         "fading-cfg"
//!     }
//!     fn on_noise_pred(
//!         &mut self,
//!         step: &StepInfo,
//!         pred: &NoisePrediction<'_>,
//!     ) -> Result<Option<Tensor>, HookError> {
//!         let Some(uncond) = pred.uncond else { return Ok(None) };
//!         let scale = 1.0 + (pred.guidance_scale - 1.0) * (1.0 - step.fraction());
//!         Ok(Some(uncond.add(&((pred.cond - uncond)? * scale)?)?))
//!     }
//! }
//!
//! let mut hooks = HookSet::new();
//! hooks.push(Box::new(FadingCfg));
//! // `hooks` is then passed to `StableDiffusion::denoise` / `generate` in sd-pipeline.
//! # let dev = candle_core::Device::Cpu;
//! # let u = Tensor::new(&[0f32, 0.0], &dev).unwrap();
//! # let c = Tensor::new(&[1f32, 2.0], &dev).unwrap();
//! # let step = StepInfo { index: 2, first_index: 0, total: 4, timestep: 500.0, batch: 1, cfg: true };
//! # let out = hooks.noise_pred(&step, &NoisePrediction { uncond: Some(&u), cond: &c, guidance_scale: 7.0 }).unwrap();
//! # assert_eq!(out.to_vec1::<f32>().unwrap(), vec![4.0, 8.0]);
//! ```

// The contracts: what the pipeline calls and what extensions implement.
mod error;
#[cfg(feature = "host")]
mod hooks;
mod hwc3;
// Config text checked for nesting before any parser sees it.
pub mod config_text;
// Checks that user-named inputs are regular files before they are opened.
pub mod input_file;
// One memory estimate for every size a user names, checked before allocation.
pub mod memory;
// One check and one message for every number from any source.
pub mod number;
// Reading image files from user paths with the decoder's size limits made explicit.
#[cfg(feature = "host")]
pub mod image_input;
pub mod params;
#[cfg(feature = "host")]
mod patch;
mod preprocess;
mod step;

// Preprocessors by name, and their result cache.
#[cfg(feature = "host")]
pub mod cache;
mod registry;

// Third-party plugin libraries behind the C ABI.
pub mod dylib;

#[doc(hidden)]
pub use inventory;

pub use dylib::plugin::{HookPlugin, OwnedTensor, Part, TensorView};
pub use error::HookError;
#[cfg(feature = "host")]
pub use hooks::{
    classifier_free_guidance, AddedCond, Conditioning, ExtraAttention, Hook, HookSet, LeadingHooks,
    NoiseLevels, NoisePrediction, Projection, ProjectionInputs, ReferencePass, ResidualInput,
    Residuals, UNetAdditions,
};
pub use hwc3::hwc3;
pub use params::{resolve_params, ParamError, ParamKind, ParamSpec, ParamValue, Params};
#[cfg(feature = "host")]
pub use patch::{ModelPart, WeightPatch};
pub use preprocess::{
    marked_control_values, BuiltinPreprocessor, ImageBuf, InputKind, PluginError, Preprocessor,
};
pub use registry::{PluginSource, Registry};
pub use step::StepInfo;
