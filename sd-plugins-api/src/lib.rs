//! Contracts between the denoising loop in `sd-pipeline` and everything that extends it.
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

pub mod abi;
#[cfg(feature = "host")]
pub mod cache;
mod error;
#[cfg(feature = "host")]
mod hooks;
#[cfg(feature = "host")]
pub mod host;
mod hwc3;
pub mod params;
#[cfg(feature = "host")]
mod patch;
pub mod plugin;
mod preprocess;
mod step;

#[doc(hidden)]
pub use inventory;

pub use error::HookError;
#[cfg(feature = "host")]
pub use hooks::{
    classifier_free_guidance, Conditioning, Hook, HookSet, NoiseLevels, NoisePrediction,
    ResidualInput, Residuals,
};
pub use hwc3::hwc3;
pub use params::{resolve_params, ParamError, ParamKind, ParamSpec, ParamValue, Params};
#[cfg(feature = "host")]
pub use patch::{ModelPart, WeightPatch};
pub use plugin::{HookPlugin, OwnedTensor, Part, TensorView};
pub use preprocess::{
    BuiltinPreprocessor, ImageBuf, PluginError, PluginSource, Preprocessor, Registry,
};
pub use step::StepInfo;
