//! DDIM, eta 0 (diffusers `DDIMScheduler`).

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{alphas_cumprod, round_half_even, trailing};
use super::{NoiseSource, Sampler, SamplerError};

pub struct Ddim {
    timesteps: Vec<f64>,
    ac: Vec<f32>,
    final_alpha_cumprod: f32,
    step_ratio: usize,
    prediction: PredictionType,
    clip: Option<f64>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> std::result::Result<Self, SamplerError> {
        let n = cfg.num_train_timesteps;
        let ts: Vec<i64> = match cfg.spacing_or(TimestepSpacing::Leading) {
            TimestepSpacing::Linspace => (0..steps)
                .rev()
                .map(|i| {
                    let v = if steps == 1 {
                        0.0
                    } else {
                        i as f64 * ((n - 1) as f64 / (steps - 1) as f64)
                    };
                    round_half_even(if i + 1 == steps { (n - 1) as f64 } else { v }) as i64
                })
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => trailing(n, n as f64 / steps as f64)
                .map(|t| t as i64 - 1)
                .collect(),
        };
        if let Some(bad) = ts.iter().find(|&&t| t < 0 || t as usize >= n) {
            return Err(SamplerError::Invalid(format!(
                "DDIM timestep {bad} is outside 0..{n} (steps_offset {} with {steps} steps)",
                cfg.steps_offset
            )));
        }
        let ac = alphas_cumprod(cfg);
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            ac[0]
        };
        Ok(Self {
            timesteps: ts.into_iter().map(|t| t as f64).collect(),
            ac,
            final_alpha_cumprod,
            step_ratio: n / steps,
            prediction: cfg.prediction_type,
            clip: cfg
                .clip_sample
                .unwrap_or(true)
                .then_some(cfg.clip_sample_range),
        })
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        eps_or_v: &Tensor,
        i: usize,
        sample: &Tensor,
        _: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timesteps[i] as usize;
        let prev = t as i64 - self.step_ratio as i64;
        let a_t = self.ac[t] as f64;
        let a_prev = if prev >= 0 {
            self.ac[prev as usize] as f64
        } else {
            self.final_alpha_cumprod as f64
        };
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                ((sample - (eps_or_v * b_t.sqrt())?)? / a_t.sqrt())?,
                eps_or_v.clone(),
            ),
            PredictionType::VPrediction => (
                ((sample * a_t.sqrt())? - (eps_or_v * b_t.sqrt())?)?,
                ((eps_or_v * a_t.sqrt())? + (sample * b_t.sqrt())?)?,
            ),
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r as f32, r as f32)?,
            None => x0,
        };
        (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let a = self.ac[self.timesteps[i] as usize] as f64;
        (original * a.sqrt())? + (noise * (1.0 - a).sqrt())?
    }
}
