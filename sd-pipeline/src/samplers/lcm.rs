//! Latent Consistency Model sampling (diffusers `LCMScheduler`, scheduling_lcm.py), for LCM /
//! LCM-LoRA / Turbo-style few-step models: the consistency function's boundary-condition
//! scalings, then fresh noise to the next timestep (none after the last).

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig};
use super::error::SamplerError;
use super::sampler::{noise_by_alpha, NoiseSource, Sampler};
use super::schedule::alphas_cumprod;

pub struct Lcm {
    /// int64 timesteps, as f64.
    timesteps: Vec<f64>,
    ac: Vec<f32>,
    timestep_scaling: f32,
    prediction: PredictionType,
    clip: Option<f32>,
}

impl Lcm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> std::result::Result<Self, SamplerError> {
        let n = cfg.num_train_timesteps;
        let original = cfg.original_inference_steps.unwrap_or(50);
        if original == 0 || original > n {
            return Err(SamplerError::Invalid(format!(
                "LCM original_inference_steps {original} must be between 1 and num_train_timesteps ({n})"
            )));
        }
        if steps > original {
            return Err(SamplerError::Invalid(format!(
                "LCM takes at most original_inference_steps ({original}) steps, not {steps}: its \
                 timesteps are a subset of the distillation schedule"
            )));
        }
        // lcm_origin_timesteps = arange(1, original + 1) * (n // original) - 1, reversed, then
        // floor(np.linspace(0, len, steps, endpoint=False)) picks
        let k = n / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let timesteps = (0..steps)
            .map(|i| origin[(i as f64 * (original as f64 / steps as f64)).floor() as usize] as f64)
            .collect();
        // (set_alpha_to_one's final_alpha_cumprod is for a negative previous timestep: none here)
        Ok(Self {
            timesteps,
            ac: alphas_cumprod(cfg),
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0) as f32,
            prediction: cfg.prediction_type,
            // LCMScheduler's clip_sample default is false (DDIM's is true)
            clip: cfg
                .clip_sample
                .unwrap_or(false)
                .then_some(cfg.clip_sample_range as f32),
        })
    }

    fn alpha_at(&self, i: usize) -> Result<f32> {
        let steps = self.timesteps.len();
        match self.timesteps.get(i) {
            Some(&t) => Ok(self.ac[t as usize]),
            None => candle_core::bail!("step index {i} is past the {steps} LCM steps"),
        }
    }
}

impl Sampler for Lcm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let a_t = self.alpha_at(i)?;
        let last = i + 1 == self.timesteps.len();
        let a_prev = if last {
            // prev_timestep = timestep (>= 0)
            a_t
        } else {
            self.ac[self.timesteps[i + 1] as usize]
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        // get_scalings_for_boundary_condition_discrete, sigma_data 0.5, float32
        let scaled = self.timesteps[i] as f32 * self.timestep_scaling;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();
        let x0 = match self.prediction {
            PredictionType::Epsilon => {
                ((sample - (model_output * b_t.sqrt() as f64)?)? / a_t.sqrt() as f64)?
            }
            PredictionType::VPrediction => {
                ((sample * a_t.sqrt() as f64)? - (model_output * b_t.sqrt() as f64)?)?
            }
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        let denoised = ((x0 * c_out as f64)? + (sample * c_skip as f64)?)?;
        if last {
            return Ok(denoised);
        }
        let z = noise
            .randn(sample.dims(), sample.device())?
            .to_dtype(sample.dtype())?;
        (denoised * a_prev.sqrt() as f64)? + (z * b_prev.sqrt() as f64)?
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        noise_by_alpha(original, noise, self.alpha_at(i)?)
    }
}
