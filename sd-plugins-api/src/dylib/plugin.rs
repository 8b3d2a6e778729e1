//! Writing a plugin: ordinary safe Rust, turned into the C ABI by
//! [`export_plugin!`](crate::export_plugin) (defined with the code it generates, in `glue`).
//!
//! A preprocessor plugin implements [`Preprocessor`](crate::preprocess::Preprocessor) (and `Default`);
//! a step-hook plugin implements [`HookPlugin`]. Then, in the `cdylib` crate:
//!
//! ```ignore
//! sd_plugins_api::export_plugin!(preprocessor: Posterize);
//! // or
//! sd_plugins_api::export_plugin!(hook: CfgRescale);
//! ```
//!
//! Panics inside a plugin's code are caught at the boundary and reported as errors.

use crate::params::{ParamSpec, Params};
use crate::step::StepInfo;

/// A borrowed f32 tensor (row-major) with its shape.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub data: &'a [f32],
    pub shape: &'a [usize],
}

/// An f32 tensor a plugin returns: row-major values and their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedTensor {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

/// Which model a weight belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Unet,
    TextEncoder,
    Vae,
    /// SDXL's second text encoder.
    TextEncoder2,
}

/// A hook living in a plugin, at the design's hook points, and optionally a weight patch.
/// Every method has a do-nothing default: return `Ok(None)` to leave a point alone; a
/// returned tensor must have the input's number of values (the host checks).
pub trait HookPlugin: Send + Sized + 'static {
    /// Name used in configs (`plugins = [{ name = "cfg_rescale", phi = 0.7 }]`).
    fn name() -> &'static str;
    fn description() -> &'static str;
    fn params() -> Vec<ParamSpec>;
    /// One instance per generation, with validated parameters.
    fn create(params: &Params) -> Result<Self, String>;

    /// Edit the text conditioning `[batch, tokens, dim]` once before sampling: new `cond`
    /// and, when there is one, new `uncond`.
    #[allow(clippy::type_complexity)]
    fn on_conditioning(
        &mut self,
        _cond: TensorView<'_>,
        _uncond: Option<TensorView<'_>>,
    ) -> Result<Option<(Vec<f32>, Option<Vec<f32>>)>, String> {
        Ok(None)
    }

    /// Edit the latents before the UNet runs.
    fn before_step(
        &mut self,
        _step: &StepInfo,
        _latents: TensorView<'_>,
    ) -> Result<Option<Vec<f32>>, String> {
        Ok(None)
    }

    /// Additive UNet residuals, down blocks then mid (a T2I-adapter-like provider).
    fn residuals(
        &mut self,
        _step: &StepInfo,
        _sample: TensorView<'_>,
        _latents: TensorView<'_>,
        _context: TensorView<'_>,
    ) -> Result<Option<Vec<OwnedTensor>>, String> {
        Ok(None)
    }

    /// Combine the predictions (`uncond` is `None` without classifier-free guidance).
    fn on_noise_pred(
        &mut self,
        _step: &StepInfo,
        _uncond: Option<TensorView<'_>>,
        _cond: TensorView<'_>,
        _guidance_scale: f64,
    ) -> Result<Option<Vec<f32>>, String> {
        Ok(None)
    }

    /// Edit the latents after the sampler stepped.
    fn after_step(
        &mut self,
        _step: &StepInfo,
        _latents: TensorView<'_>,
    ) -> Result<Option<Vec<f32>>, String> {
        Ok(None)
    }

    /// Post-process decoded images `[batch, 3, H, W]` in [0, 1].
    fn on_image(&mut self, _images: TensorView<'_>) -> Result<Option<Vec<f32>>, String> {
        Ok(None)
    }

    /// Whether [`HookPlugin::weight_delta`] wants parameter `name` (asked before its values
    /// are copied out).
    fn patches(&self, _part: Part, _name: &str) -> bool {
        false
    }

    /// The delta to add to a parameter while weights load (LoRA-like patches).
    fn weight_delta(
        &self,
        _part: Part,
        _name: &str,
        _base: TensorView<'_>,
    ) -> Result<Option<Vec<f32>>, String> {
        Ok(None)
    }
}
