//! DPM-Solver++ multistep (diffusers `DPMSolverMultistepScheduler`, algorithm dpmsolver++,
//! midpoint solver, lower_order_final, final sigma 0), order 1 or 2.

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{
    alphas_cumprod, interp, karras, round_half_even, sigma_to_t, trailing, train_sigmas,
};
use super::{NoiseSource, Sampler, SamplerError};

pub struct DpmSolver {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    order: usize,
    prediction: PredictionType,
    /// The previous step's data prediction and the number of steps taken so far.
    previous: Option<Tensor>,
    lower_order_nums: usize,
}

/// `(alpha_t, sigma_t)` of a VP process with noise level `sigma`.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

impl DpmSolver {
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        order: usize,
        use_karras: bool,
    ) -> std::result::Result<Self, SamplerError> {
        let n = cfg.num_train_timesteps;
        // lambda_min_clipped = -inf: the last timestep is n
        let ts: Vec<f64> = match cfg.spacing_or(TimestepSpacing::Linspace) {
            TimestepSpacing::Linspace => {
                // np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
                let m = steps + 1;
                (1..m)
                    .rev()
                    .map(|i| {
                        let v = if i == m - 1 {
                            (n - 1) as f64
                        } else {
                            i as f64 * ((n - 1) as f64 / (m - 1) as f64)
                        };
                        round_half_even(v)
                    })
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = n / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => trailing(n, n as f64 / steps as f64)
                .map(|t| t - 1.0)
                .collect(),
        };
        let train = train_sigmas(&alphas_cumprod(cfg));
        let (sigmas, timesteps): (Vec<f64>, Vec<f64>) = if use_karras {
            let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            let k = karras(train[0] as f64, train[n - 1] as f64, steps);
            let t = k
                .iter()
                .map(|&s| round_half_even(sigma_to_t(s, &log_sigmas)))
                .collect();
            (k, t)
        } else {
            (ts.iter().map(|&t| interp(t, &train)).collect(), ts)
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            order,
            prediction: cfg.prediction_type,
            previous: None,
            lower_order_nums: 0,
        })
    }
}

impl Sampler for DpmSolver {
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
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let s0 = self.sigmas[i] as f64;
        let st = self.sigmas[i + 1] as f64;
        let (alpha_s0, sigma_s0) = alpha_sigma(s0);
        let (alpha_t, sigma_t) = alpha_sigma(st);
        // convert_model_output: the data prediction x0
        let x0 = match self.prediction {
            PredictionType::Epsilon => ((sample - (model_output * sigma_s0)?)? / alpha_s0)?,
            PredictionType::VPrediction => ((sample * alpha_s0)? - (model_output * sigma_s0)?)?,
        };
        let h = lambda(st) - lambda(s0);
        let coef = alpha_t * ((-h).exp() - 1.0);
        let ratio = if s0 == 0.0 { 0.0 } else { sigma_t / sigma_s0 };
        let last = i + 1 == self.timesteps.len();
        // lower_order_final: the last step is first order (final sigma 0)
        let first_order = self.order == 1 || self.lower_order_nums < 1 || last;
        let out = match (&self.previous, first_order) {
            (Some(m1), false) => {
                let s1 = self.sigmas[i - 1] as f64;
                let r0 = (lambda(s0) - lambda(s1)) / h;
                let d1 = ((&x0 - m1)? * (1.0 / r0))?;
                ((sample * ratio)? - (&x0 * coef)?)?.sub(&(d1 * (0.5 * coef))?)?
            }
            _ => ((sample * ratio)? - (&x0 * coef)?)?,
        };
        self.previous = Some(x0);
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(out)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[i] as f64);
        (original * a)? + (noise * s)?
    }
}
