//! Euler and Euler ancestral (diffusers `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler`), on the interpolated or the Karras sigmas.

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::error::SamplerError;
use super::sampler::{NoiseSource, Sampler};
use super::schedule::{
    alphas_cumprod, interp, karras, log_sigmas, np_arange_down, np_linspace, round_half_even,
    sigma_to_t, train_sigmas,
};

pub struct Euler {
    /// float32 timesteps, as f64.
    timesteps: Vec<f64>,
    /// float32 sigmas, one per step plus the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    ancestral: bool,
}

/// Inference timesteps (descending) of the Euler-family schedulers, as float32 values
/// (scheduling_euler_discrete.py set_timesteps; the ancestral scheduler is identical).
fn euler_timesteps(cfg: &SchedulerConfig, steps: usize, spacing: TimestepSpacing) -> Vec<f32> {
    let n = cfg.num_train_timesteps;
    match spacing {
        // np.linspace(0, n - 1, steps, dtype=np.float32)[::-1]: float64 grid cast to float32
        TimestepSpacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        // (np.arange(steps) * (n // steps)).round()[::-1].astype(float32) + steps_offset
        TimestepSpacing::Leading => (0..steps)
            .rev()
            .map(|i| (i * (n / steps)) as f32 + cfg.steps_offset as f32)
            .collect(),
        // np.arange(n, 0, -n / steps).round().astype(float32) - 1
        TimestepSpacing::Trailing => np_arange_down(n as f64, n as f64 / steps as f64)
            .into_iter()
            .map(|t| round_half_even(t) as f32 - 1.0)
            .collect(),
    }
}

impl Euler {
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        use_karras: bool,
        ancestral: bool,
    ) -> std::result::Result<Self, SamplerError> {
        let spacing = cfg.spacing_or(TimestepSpacing::Linspace);
        let ts = euler_timesteps(cfg, steps, spacing);
        let train = train_sigmas(&alphas_cumprod(cfg));
        // np.interp(timesteps, arange(n), sigmas): float64
        let interpolated: Vec<f64> = ts.iter().map(|&t| interp(t as f64, &train)).collect();
        let (sigmas, timesteps): (Vec<f64>, Vec<f32>) = if use_karras {
            // Karras between the interpolated ends (or the config's sigma_min / sigma_max),
            // timesteps by _sigma_to_t, unrounded. Euler a + karras uses exactly these.
            let log_sigmas = log_sigmas(&train);
            let k = karras(
                cfg.sigma_min.unwrap_or(interpolated[steps - 1]),
                cfg.sigma_max.unwrap_or(interpolated[0]),
                steps,
            );
            let t = k
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
            (k, t)
        } else {
            (interpolated, ts)
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().cloned().fold(0f32, f32::max);
        // init_noise_sigma: sigmas.max() for linspace/trailing, (max ** 2 + 1) ** 0.5 (float32)
        // for leading
        let init_noise_sigma = match spacing {
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
            _ => max,
        };
        Ok(Self {
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            sigmas,
            init_noise_sigma,
            prediction: cfg.prediction_type,
            ancestral,
        })
    }

    fn sigma(&self, i: usize) -> Result<f32> {
        match self.sigmas.get(i) {
            Some(&s) if i < self.timesteps.len() => Ok(s),
            _ => candle_core::bail!(
                "step index {i} is past the {} Euler steps",
                self.timesteps.len()
            ),
        }
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
        let s = self.sigma(i)?;
        sample / (s * s + 1.0).sqrt() as f64
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
        let x0 = match self.prediction {
            PredictionType::Epsilon => (sample - (model_output * sigma as f64)?)?,
            // model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                ((model_output * (-sigma / s2.sqrt()) as f64)? + (sample / s2 as f64)?)?
            }
        };
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
