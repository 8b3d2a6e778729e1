//! DPM-Solver++ multistep (diffusers `DPMSolverMultistepScheduler`,
//! scheduling_dpmsolver_multistep.py: algorithm dpmsolver++, midpoint solver,
//! lower_order_final, final sigma 0), order 1 (= DDIM) or 2 (= DPM++ 2M).

use candle_core::{Result, Tensor};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::error::SamplerError;
use super::sampler::{NoiseSource, Sampler};
use super::schedule::{
    alphas_cumprod, convert, interp, log_sigmas, np_arange_down, np_linspace, round_half_even,
    sigma_to_t, train_sigmas, Conversion,
};

pub struct DpmSolver {
    /// int64 timesteps, as f64.
    timesteps: Vec<f64>,
    /// float32 sigmas, one per step plus the final 0.
    sigmas: Vec<f32>,
    order: usize,
    sde: bool,
    prediction: PredictionType,
    /// The previous step's data prediction (`model_outputs[-2]` at the next step).
    previous: Option<Tensor>,
    lower_order_nums: usize,
}

/// `_sigma_to_alpha_sigma_t` in float32: `alpha_t = 1 / (sigma**2 + 1) ** 0.5`, `sigma_t = sigma * alpha_t`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

/// `lambda = log(alpha_t) - log(sigma_t)` in float32 (+inf at sigma 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// Timesteps (int64, as f64) and float32 sigmas with the final 0 of the multistep solvers
/// (scheduling_dpmsolver_multistep.py / scheduling_unipc_multistep.py `set_timesteps`, lambda_min_clipped
/// -inf, final_sigmas_type zero). A conversion redraws the sigmas between the *train* schedule's ends
/// (or the config's `sigma_min` / `sigma_max`), timesteps by `_sigma_to_t`: rounded for Karras (except
/// DPM-Solver's squaredcos_cap_v2, when `cosine_truncates`), truncated by the int64 cast otherwise.
pub(super) fn multistep_schedule(
    cfg: &SchedulerConfig,
    steps: usize,
    conv: Option<Conversion>,
    cosine_truncates: bool,
    what: &str,
) -> std::result::Result<(Vec<f64>, Vec<f32>), SamplerError> {
    let n = cfg.num_train_timesteps;
    let ts: Vec<f64> = match cfg.spacing_or(TimestepSpacing::Linspace) {
        // np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
        TimestepSpacing::Linspace => np_linspace(0.0, (n - 1) as f64, steps + 1)
            .into_iter()
            .skip(1)
            .rev()
            .map(round_half_even)
            .collect(),
        // (np.arange(steps + 1) * (n // (steps + 1))).round()[::-1][:-1] + steps_offset
        TimestepSpacing::Leading => (1..=steps)
            .rev()
            .map(|i| (i * (n / (steps + 1)) + cfg.steps_offset) as f64)
            .collect(),
        // np.arange(n, 0, -n / steps).round() - 1
        TimestepSpacing::Trailing => np_arange_down(n as f64, n as f64 / steps as f64)
            .into_iter()
            .map(|t| round_half_even(t) - 1.0)
            .collect(),
    };
    let train = train_sigmas(&alphas_cumprod(cfg));
    let (sigmas, timesteps): (Vec<f64>, Vec<f64>) = match conv {
        Some(conv) => {
            let log_sigmas = log_sigmas(&train);
            let k = convert(
                conv,
                cfg.sigma_min.unwrap_or(train[0] as f64),
                cfg.sigma_max.unwrap_or(train[n - 1] as f64),
                steps,
            );
            let round = conv == Conversion::Karras
                && !(cosine_truncates && cfg.beta_schedule == BetaSchedule::SquaredCosCapV2);
            let t = k
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    if round {
                        round_half_even(t)
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            (k, t)
        }
        None => (ts.iter().map(|&t| interp(t, &train)).collect(), ts),
    };
    if let Some(bad) = timesteps.iter().find(|&&t| t < 0.0 || t >= n as f64) {
        return Err(SamplerError::Invalid(format!(
            "{what} timestep {bad} is outside 0..{n} (steps_offset {} with {steps} steps)",
            cfg.steps_offset
        )));
    }
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    sigmas.push(0.0);
    Ok((timesteps, sigmas))
}

impl DpmSolver {
    /// `sde`: algorithm_type "sde-dpmsolver++" (DPM++ 2M SDE), which draws noise every step.
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        order: usize,
        conv: Option<Conversion>,
        sde: bool,
    ) -> std::result::Result<Self, SamplerError> {
        let (timesteps, sigmas) = multistep_schedule(cfg, steps, conv, true, "DPM-Solver")?;
        Ok(Self {
            timesteps,
            sigmas,
            order,
            sde,
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

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            candle_core::bail!(
                "step index {i} is past the {} DPM-Solver steps",
                self.timesteps.len()
            );
        }
        // the SDE variant draws its noise on every step, the last included
        let z = if self.sde {
            Some(
                noise
                    .randn(sample.dims(), sample.device())?
                    .to_dtype(sample.dtype())?,
            )
        } else {
            None
        };
        // float32 0-d tensor arithmetic throughout, as diffusers
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        // convert_model_output: the data prediction x0
        let x0 = match self.prediction {
            PredictionType::Epsilon => {
                ((sample - (model_output * sigma_s0 as f64)?)? / alpha_s0 as f64)?
            }
            PredictionType::VPrediction => {
                ((sample * alpha_s0 as f64)? - (model_output * sigma_s0 as f64)?)?
            }
        };
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        // dpmsolver++: x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) D0 [- 0.5 alpha_t (e^-h - 1) D1];
        // sde-dpmsolver++: x_t = (sigma_t / sigma_s e^-h) x + alpha_t (1 - e^-2h) D0
        //   [+ 0.5 alpha_t (1 - e^-2h) D1] + sigma_t sqrt(1 - e^-2h) z
        let (ratio, coef) = match z {
            None => (sigma_t / sigma_s0, alpha_t * ((-h).exp() - 1.0)),
            Some(_) => (
                sigma_t / sigma_s0 * (-h).exp(),
                -(alpha_t * (1.0 - (-2.0 * h).exp())),
            ),
        };
        // lower_order_final with final_sigmas_type "zero": the last step is always first order
        let last = i + 1 == self.timesteps.len();
        let first_order = self.order == 1 || self.lower_order_nums < 1 || last;
        let base = ((sample * ratio as f64)? - (&x0 * coef as f64)?)?;
        let out = match (&self.previous, first_order) {
            (Some(m1), false) => {
                // multistep_dpm_solver_second_order_update, midpoint
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                let r0 = (lambda_s0 - lambda(alpha_s1, sigma_s1)) / h;
                let d1 = ((&x0 - m1)? * (1.0 / r0) as f64)?;
                (base - (d1 * (0.5 * coef) as f64)?)?
            }
            _ => base,
        };
        let out = match z {
            Some(z) => (out + (z * (sigma_t * (1.0 - (-2.0 * h).exp()).sqrt()) as f64)?)?,
            None => out,
        };
        self.previous = Some(x0);
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(out)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            candle_core::bail!(
                "step index {i} is past the {} DPM-Solver steps",
                self.timesteps.len()
            );
        }
        let (a, s) = alpha_sigma(self.sigmas[i]);
        (original * a as f64)? + (noise * s as f64)?
    }
}
