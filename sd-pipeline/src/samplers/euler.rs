//! Euler and Euler ancestral (diffusers `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler`), on the interpolated or the Karras sigmas.

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::error::SamplerError;
use super::sampler::{level_at, scale_by_sigma, NoiseSource, Sampler};
use super::schedule::{discrete_sigmas, Conversion};

/// float32 sigmas with the final 0 appended, and `init_noise_sigma`: `sigmas.max()` for
/// linspace/trailing spacing, `(max ** 2 + 1) ** 0.5` (float32) for leading.
/// `pred_original_sample` of the sigma-parametrised schedulers (Euler, Heun, LMS, DPM-Solver
/// SDE) at noise level `sigma`, float32 scalars.
pub(super) fn denoised(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => sample - (model_output * sigma as f64)?,
        // model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            (model_output * (-sigma / s2.sqrt()) as f64)? + (sample / s2 as f64)?
        }
    }
}

pub(super) fn with_final_zero(cfg: &SchedulerConfig, sigmas: Vec<f64>) -> (Vec<f32>, f32) {
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    sigmas.push(0.0);
    let max = sigmas.iter().cloned().fold(0f32, f32::max);
    let init = match cfg.spacing_or(TimestepSpacing::Linspace) {
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        _ => max,
    };
    (sigmas, init)
}

pub struct Euler {
    /// float32 timesteps, as f64.
    timesteps: Vec<f64>,
    /// float32 sigmas, one per step plus the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    ancestral: bool,
}

impl Euler {
    /// `conv`: the schedule's redrawn sigmas (Karras, exponential, beta); Euler a takes the
    /// sigmas and timesteps `EulerDiscreteScheduler` computes for them.
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        conv: Option<Conversion>,
        ancestral: bool,
    ) -> std::result::Result<Self, SamplerError> {
        let (timesteps, sigmas) = discrete_sigmas(cfg, steps, conv, true, true);
        let (sigmas, init_noise_sigma) = with_final_zero(cfg, sigmas);
        Ok(Self {
            timesteps: timesteps.into_iter().map(|t| t as f32 as f64).collect(),
            sigmas,
            init_noise_sigma,
            prediction: cfg.prediction_type,
            ancestral,
        })
    }

    fn sigma(&self, i: usize) -> Result<f32> {
        level_at(&self.sigmas, self.timesteps.len(), i, "Euler")
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.sigma(i)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        // float32 0-d tensor arithmetic, as in both schedulers' step (s_churn = 0: sigma_hat = sigma)
        let sigma = self.sigma(i)?;
        let next = self.sigmas[i + 1];
        let x0 = denoised(self.prediction, model_output, sample, sigma)?;
        let derivative = ((sample - &x0)? / sigma as f64)?;
        if !self.ancestral {
            return sample + (derivative * (next - sigma) as f64)?;
        }
        let (from2, to2) = (sigma * sigma, next * next);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let prev = (sample + (derivative * (sigma_down - sigma) as f64)?)?;
        // diffusers draws the noise on every step, the last (sigma_up = 0) included
        let n = noise.randn(model_output.dims(), model_output.device())?;
        prev + (n.to_dtype(model_output.dtype())? * sigma_up as f64)?
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        original + (noise * self.sigma(i)? as f64)?
    }
}
