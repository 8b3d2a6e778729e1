//! Linear multistep, order 4 (diffusers `LMSDiscreteScheduler`, scheduling_lms_discrete.py).

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig};
use super::error::SamplerError;
use super::euler::{denoised, with_final_zero};
use super::sampler::{level_at, scale_by_sigma, NoiseSource, Sampler};
use super::schedule::{discrete_sigmas, Conversion};

const ORDER: usize = 4;

pub struct Lms {
    /// float32 timesteps, as f64.
    timesteps: Vec<f64>,
    /// float32 sigmas, one per step plus the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    /// The last (up to 4) derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        conv: Option<Conversion>,
    ) -> std::result::Result<Self, SamplerError> {
        // LMS's _convert_to_karras takes the schedule's own ends, never the config's
        let config_bounds = conv != Some(Conversion::Karras);
        let (ts, sigmas) = discrete_sigmas(cfg, steps, conv, config_bounds, true);
        let (sigmas, init_noise_sigma) = with_final_zero(cfg, sigmas);
        Ok(Self {
            timesteps: ts.into_iter().map(|t| t as f32 as f64).collect(),
            sigmas,
            init_noise_sigma,
            prediction: cfg.prediction_type,
            derivatives: Vec::new(),
        })
    }

    /// `get_lms_coefficient`: the integral over `[sigmas[t], sigmas[t + 1]]` of the Lagrange
    /// basis polynomial of node `t - current` among nodes `t, t - 1, ..., t - order + 1`. diffusers
    /// integrates it with scipy's `quad` (exact for polynomials); 4-point Gauss-Legendre is exact
    /// up to degree 7, and the polynomial's degree is at most 3.
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = |k: usize| self.sigmas[k] as f64;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(t - k)) / (s(t - current) - s(t - k)))
                .product::<f64>()
        };
        const NODES: [(f64, f64); 4] = [
            (-0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
            (-0.339_981_043_584_856_26, 0.652_145_154_862_546_1),
            (0.339_981_043_584_856_26, 0.652_145_154_862_546_1),
            (0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
        ];
        let (a, b) = (s(t), s(t + 1));
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        NODES
            .iter()
            .map(|&(x, w)| w * basis(mid + half * x))
            .sum::<f64>()
            * half
    }
}

impl Sampler for Lms {
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
        _: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.sigma(i)?;
        let x0 = denoised(self.prediction, model_output, sample, sigma)?;
        self.derivatives.push(((sample - x0)? / sigma as f64)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        // order = min(step_index + 1, 4): by index, so an img2img start mid-schedule asks for
        // more coefficients than it has derivatives, and zip() drops the extra ones
        let order = (i + 1).min(ORDER);
        // sample + sum(coeff * derivative ...), the sum first
        let mut sum: Option<Tensor> = None;
        for (k, d) in (0..order).zip(self.derivatives.iter().rev()) {
            let term = (d * self.coefficient(order, i, k))?;
            sum = Some(match sum {
                None => term,
                Some(s) => (s + term)?,
            });
        }
        sample + sum.expect("one derivative at least")
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        original + (noise * self.sigma(i)? as f64)?
    }
}

impl Lms {
    fn sigma(&self, i: usize) -> Result<f32> {
        level_at(&self.sigmas, self.timesteps.len(), i, "LMS")
    }
}
