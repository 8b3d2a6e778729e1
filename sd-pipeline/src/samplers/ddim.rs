//! DDIM, eta 0 (diffusers `DDIMScheduler`, scheduling_ddim.py).

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::error::SamplerError;
use super::sampler::{noise_by_alpha, NoiseSource, Sampler};
use super::schedule::{alphas_cumprod, np_arange_down, np_linspace, round_half_even};

pub struct Ddim {
    timesteps: Vec<f64>,
    /// float32 `alphas_cumprod`, indexed by train timestep.
    ac: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `num_train_timesteps // num_inference_steps`, whatever the spacing (scheduling_ddim.py step).
    step_ratio: usize,
    prediction: PredictionType,
    clip: Option<f32>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> std::result::Result<Self, SamplerError> {
        let n = cfg.num_train_timesteps;
        let ts: Vec<i64> = match cfg.spacing_or(TimestepSpacing::Leading) {
            // np.linspace(0, n - 1, steps).round()[::-1]
            TimestepSpacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| round_half_even(t) as i64)
                .collect(),
            // (np.arange(0, steps) * (n // steps)).round()[::-1] + steps_offset
            TimestepSpacing::Leading => (0..steps)
                .rev()
                .map(|i| (i * (n / steps) + cfg.steps_offset) as i64)
                .collect(),
            // np.round(np.arange(n, 0, -n / steps)) - 1
            TimestepSpacing::Trailing => np_arange_down(n as f64, n as f64 / steps as f64)
                .into_iter()
                .map(|t| round_half_even(t) as i64 - 1)
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
                .then_some(cfg.clip_sample_range as f32),
        })
    }

    fn alpha_at(&self, i: usize) -> Result<f32> {
        let steps = self.timesteps.len();
        match self.timesteps.get(i) {
            Some(&t) => Ok(self.ac[t as usize]),
            None => candle_core::bail!("step index {i} is past the {steps} DDIM steps"),
        }
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        // float32 0-d tensor arithmetic, as in scheduling_ddim.py step (eta = 0)
        let a_t = self.alpha_at(i)?;
        let prev = self.timesteps[i] as i64 - self.step_ratio as i64;
        let a_prev = if prev >= 0 {
            self.ac[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt() as f64, b_t.sqrt() as f64);
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                ((sample - (model_output * sb)?)? / sa)?,
                model_output.clone(),
            ),
            PredictionType::VPrediction => (
                ((sample * sa)? - (model_output * sb)?)?,
                ((model_output * sa)? + (sample * sb)?)?,
            ),
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        // std_dev_t = 0: direction (1 - a_prev - 0) ** 0.5
        let dir = (1.0 - a_prev).sqrt() as f64;
        (x0 * a_prev.sqrt() as f64)? + (eps * dir)?
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        noise_by_alpha(original, noise, self.alpha_at(i)?)
    }
}
