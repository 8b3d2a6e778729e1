//! What a sampler is ([`Sampler`]) and where its noise comes from ([`NoiseSource`]).

use candle_core::{Device, Tensor};

/// The noise level of step `i` of `steps` (`sigmas` may hold a final 0 past them), or an error
/// naming the sampler.
pub(super) fn level_at(
    levels: &[f32],
    steps: usize,
    i: usize,
    what: &str,
) -> candle_core::Result<f32> {
    match levels.get(i) {
        Some(&s) if i < steps => Ok(s),
        _ => candle_core::bail!("step index {i} is past the {steps} {what} steps"),
    }
}

/// The sigma samplers' `scale_model_input`: `sample / (sigma**2 + 1) ** 0.5`.
pub(super) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    sample / (sigma * sigma + 1.0).sqrt() as f64
}

/// The alpha samplers' `add_noise` (DDIM, LCM): `a ** 0.5 x + (1 - a) ** 0.5 e`.
pub(super) fn noise_by_alpha(
    original: &Tensor,
    noise: &Tensor,
    a: f32,
) -> candle_core::Result<Tensor> {
    (original * a.sqrt() as f64)? + (noise * (1.0 - a).sqrt() as f64)?
}

/// Supplies the per-step noise of ancestral samplers (and anything else random).
/// Tests replay recorded noise through it.
pub trait NoiseSource {
    fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor>;
}

/// One sampler run over a fixed schedule. Indices `i` count steps of the full schedule
/// (diffusers' `step_index` with `set_begin_index`), so an img2img run starts at
/// [`super::img2img_start_index`] and inpainting re-noises with `add_noise(.., i + 1)` after step `i`.
pub trait Sampler {
    /// Model timesteps (what the UNet receives), one per inference step, in order: exactly
    /// diffusers' `scheduler.timesteps` (int64 for DDIM/DPM-Solver, float32 for Euler/Euler a).
    fn timesteps(&self) -> &[f64];
    /// Model calls per step (diffusers' `scheduler.order`): 2 for Heun and DPM++ SDE, whose
    /// `timesteps()` hold `2 * steps - 1` entries; an img2img run starts at `order * start`.
    fn order(&self) -> usize {
        1
    }
    /// Standard deviation of the initial txt2img latents (1 for DDIM/DPM-Solver).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers `scale_model_input` for step `i` (index into `timesteps`).
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }
    /// One step from index `i`: `model_output` is the (guided) UNet output for `timesteps()[i]`.
    /// Multistep samplers remember earlier outputs: call it for consecutive `i`.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> candle_core::Result<Tensor>;
    /// `original` noised to the level of step `i` (img2img start, inpaint blending): DDIM uses
    /// `alphas_cumprod[timesteps[i]]`, the sigma samplers `sigmas[i]`. `i` must be below
    /// `timesteps().len()` (diffusers' inpainting skips the blend after the last step).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize)
        -> candle_core::Result<Tensor>;
}
