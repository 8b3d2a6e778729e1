//! Euler and Euler ancestral (diffusers `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler`), on the interpolated or the Karras sigmas.

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{alphas_cumprod, euler_timesteps, interp, karras, sigma_to_t, train_sigmas};
use super::{NoiseSource, Sampler, SamplerError};

pub struct Euler {
    timesteps: Vec<f64>,
    /// float32 sigmas, one per step plus the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: PredictionType,
    ancestral: bool,
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
        let interpolated: Vec<f64> = ts.iter().map(|&t| interp(t as f64, &train)).collect();
        let (sigmas, timesteps): (Vec<f64>, Vec<f32>) = if use_karras {
            // scheduling_euler_discrete.py: Karras between the interpolated ends, timesteps by _sigma_to_t
            let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            let k = karras(interpolated[steps - 1], interpolated[0], steps);
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
        let max = sigmas.iter().cloned().fold(0f32, f32::max) as f64;
        // init_noise_sigma: max sigma for linspace/trailing, sqrt(max^2 + 1) for leading
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

    fn denoised(&self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        match self.prediction {
            PredictionType::Epsilon => sample - (model_output * sigma)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (model_output * (-sigma / s2.sqrt()))? + (sample / s2)?
            }
        }
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i] as f64;
        sample / (s * s + 1.0).sqrt()
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[i] as f64;
        let next = self.sigmas[i + 1] as f64;
        let x0 = self.denoised(model_output, sample, sigma)?;
        let derivative = ((sample - &x0)? / sigma)?;
        if !self.ancestral {
            return sample + (derivative * (next - sigma))?;
        }
        let sigma_up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
        let sigma_down = (next * next - sigma_up * sigma_up).sqrt();
        let prev = (sample + (derivative * (sigma_down - sigma))?)?;
        let n = noise.randn(model_output.dims(), model_output.device())?;
        let n = (n.to_dtype(prev.dtype())? * sigma_up)?;
        prev + n
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        original + (noise * self.sigmas[i] as f64)?
    }
}
