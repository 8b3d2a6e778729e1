//! sd-webui-controlnet's reference-only (`ControlModelType.AttentionInjection`, scripts/
//! hook.py): no model; the reference image, encoded to latents (the VAE's mean) and noised to
//! each step's timestep (`q_sample` with `round(t)`), goes through the UNet first, whose
//! transformer layers keep their `norm1` outputs; the generation's self-attention then
//! attends to them as well (`sd_plugins_api::ReferencePass`).

use candle_core::{DType, Tensor};
use sd_pipeline::rng::TorchRng;
use sd_plugins_api::{ReferencePass, StepInfo};

/// A reference-only unit.
#[derive(Clone)]
pub struct ReferenceUnit {
    /// The reference's latents at the generation size, `[1, C, h, w]` (scaled).
    pub latents: Tensor,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
    pub style_fidelity: f64,
    /// The model's `alphas_cumprod`, by train timestep.
    pub alphas_cumprod: Vec<f32>,
    /// Seed of the reference noise (the extension draws it from the global generator each
    /// step; here a stream of its own: the generation's seed).
    pub seed: u64,
    /// Attention injection and / or AdaIN (`reference_only`, `reference_adain`,
    /// `reference_adain+attn`).
    pub attention: bool,
    pub adain: bool,
}

impl ReferenceUnit {
    /// This step's pass: the reference noised to `round(t)` for every batch row (fresh noise
    /// each step, from `rng`); a 9-channel UNet gets a zero mask and the reference latents
    /// appended, as the extension's inpaint hijack.
    pub fn pass(
        &self,
        step: &StepInfo,
        rows: usize,
        channels: usize,
        dtype: DType,
        rng: &mut TorchRng,
    ) -> candle_core::Result<ReferencePass> {
        let n = self.alphas_cumprod.len();
        let t = (step.timestep.round().max(0.0) as usize).min(n.saturating_sub(1));
        let a = self.alphas_cumprod[t] as f64;
        let x0 = self.latents.to_dtype(DType::F32)?.repeat((rows, 1, 1, 1))?;
        let noise = Tensor::from_vec(rng.randn_f32(x0.elem_count()), x0.dims(), x0.device())?;
        let mut xt = ((x0.clone() * a.sqrt())? + (noise * (1.0 - a).sqrt())?)?;
        if channels == 2 * x0.dim(1)? + 1 {
            let mask = xt.narrow(1, 0, 1)?.zeros_like()?;
            xt = Tensor::cat(&[&xt, &mask, &x0], 1)?;
        }
        Ok(ReferencePass {
            latents: xt.to_dtype(dtype)?,
            weight: self.weight,
            style_fidelity: self.style_fidelity,
            uncond_rows: if step.cfg { step.batch } else { 0 },
            attention: self.attention,
            adain: self.adain,
        })
    }
}
