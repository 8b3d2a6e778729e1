//! UniPC (diffusers `UniPCMultistepScheduler`, scheduling_unipc_multistep.py) with its defaults:
//! order 2, bh2, predict_x0, lower_order_final, corrector on every step, final sigma 0.

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig};
use super::dpm::multistep_schedule;
use super::error::SamplerError;
use super::sampler::{NoiseSource, Sampler};
use super::schedule::Conversion;

const SOLVER_ORDER: usize = 2;

pub struct UniPc {
    /// int64 timesteps, as f64.
    timesteps: Vec<f64>,
    /// float32 sigmas, one per step plus the final 0.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    /// Converted model outputs (data predictions), oldest first, at most two.
    outputs: Vec<Tensor>,
    /// The sample the last predictor started from (the corrector's `last_sample`).
    last_sample: Option<Tensor>,
    /// The last predictor's order (`this_order`).
    this_order: usize,
    lower_order_nums: usize,
}

/// `_sigma_to_alpha_sigma_t` and `lambda = log(alpha) - log(sigma)`, float32.
fn alpha_sigma_lambda(sigma: f32) -> (f32, f32, f32) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * a;
    (a, s, a.ln() - s.ln())
}

impl UniPc {
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        conv: Option<Conversion>,
    ) -> std::result::Result<Self, SamplerError> {
        let (timesteps, sigmas) = multistep_schedule(cfg, steps, conv, false, "UniPC")?;
        Ok(Self {
            timesteps,
            sigmas,
            prediction: cfg.prediction_type,
            outputs: Vec::new(),
            last_sample: None,
            this_order: 1,
            lower_order_nums: 0,
        })
    }

    /// `h * phi` terms of the bh2 update from `lambda_s0` to `lambda_t` (predict_x0: hh = -h):
    /// `(h_phi_1, B_h, h)` with `h_phi_1 = B_h = expm1(-h)`.
    fn phi(lambda_t: f32, lambda_s0: f32) -> (f32, f32, f32) {
        let h = lambda_t - lambda_s0;
        let h_phi_1 = (-h).exp_m1();
        (h_phi_1, h_phi_1, h)
    }
}

impl Sampler for UniPc {
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
        if i >= self.timesteps.len() {
            candle_core::bail!(
                "step index {i} is past the {} UniPC steps",
                self.timesteps.len()
            );
        }
        // convert_model_output (predict_x0)
        let (alpha_s, sigma_s, _) = alpha_sigma_lambda(self.sigmas[i]);
        let m_new = match self.prediction {
            PredictionType::Epsilon => {
                ((sample - (model_output * sigma_s as f64)?)? / alpha_s as f64)?
            }
            PredictionType::VPrediction => {
                ((sample * alpha_s as f64)? - (model_output * sigma_s as f64)?)?
            }
        };
        // multistep_uni_c_bh_update: correct the sample the last predictor made
        let sample = match (&self.last_sample, i > 0) {
            (Some(x), true) => {
                let m0 = self.outputs.last().expect("an output per predictor step");
                let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i]);
                let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i - 1]);
                let (h_phi_1, b_h, h) = Self::phi(lambda_t, lambda_s0);
                let x_t_ =
                    ((x * (sigma_t / sigma_s0) as f64)? - (m0 * (alpha_t * h_phi_1) as f64)?)?;
                let d1_t = (&m_new - m0)?;
                let corr = if self.this_order == 1 {
                    // rhos_c = [0.5]
                    (d1_t * 0.5)?
                } else {
                    // order 2: rk from the output before m0; solve [[1, 1], [rk, 1]] rhos = b
                    let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 2]);
                    let rk = (lambda_s1 - lambda_s0) / h;
                    let m1 = &self.outputs[self.outputs.len() - 2];
                    let d1 = ((m1 - m0)? / rk as f64)?;
                    let hh = -h;
                    let mut h_phi_k = h_phi_1 / hh - 1.0;
                    let b1 = h_phi_k / b_h;
                    h_phi_k = h_phi_k / hh - 0.5;
                    let b2 = h_phi_k * 2.0 / b_h;
                    let (rho0, rho1) = solve2(rk, b1, b2);
                    ((d1 * rho0 as f64)? + (d1_t * rho1 as f64)?)?
                };
                (x_t_ - (corr * (alpha_t * b_h) as f64)?)?
            }
            _ => sample.clone(),
        };
        self.outputs.push(m_new);
        if self.outputs.len() > SOLVER_ORDER {
            self.outputs.remove(0);
        }
        // lower_order_final: min(order, steps left); warm-up: min(.., lower_order_nums + 1)
        let this_order = SOLVER_ORDER
            .min(self.timesteps.len() - i)
            .min(self.lower_order_nums + 1);
        self.this_order = this_order;
        self.last_sample = Some(sample.clone());
        // multistep_uni_p_bh_update
        let m0 = self.outputs.last().expect("just pushed");
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i]);
        let (h_phi_1, b_h, h) = Self::phi(lambda_t, lambda_s0);
        let x_t_ = ((&sample * (sigma_t / sigma_s0) as f64)? - (m0 * (alpha_t * h_phi_1) as f64)?)?;
        let out = if this_order == 2 {
            let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
            let rk = (lambda_s1 - lambda_s0) / h;
            let d1 = ((&self.outputs[0] - m0)? / rk as f64)?;
            // rhos_p = [0.5]
            (x_t_ - ((d1 * 0.5)? * (alpha_t * b_h) as f64)?)?
        } else {
            x_t_
        };
        if self.lower_order_nums < SOLVER_ORDER {
            self.lower_order_nums += 1;
        }
        Ok(out)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            candle_core::bail!(
                "step index {i} is past the {} UniPC steps",
                self.timesteps.len()
            );
        }
        let (a, s, _) = alpha_sigma_lambda(self.sigmas[i]);
        (original * a as f64)? + (noise * s as f64)?
    }
}

/// `torch.linalg.solve([[1, 1], [rk, 1]], [b1, b2])` in float32 (LU with partial pivoting).
fn solve2(rk: f32, b1: f32, b2: f32) -> (f32, f32) {
    if rk.abs() > 1.0 {
        // pivot on row 2: rk x + y = b2, then (1 - 1/rk) y = b1 - b2 / rk
        let l = 1.0 / rk;
        let u22 = 1.0 - l;
        let y = (b1 - l * b2) / u22;
        ((b2 - y) / rk, y)
    } else {
        let u22 = 1.0 - rk;
        let y = (b2 - rk * b1) / u22;
        (b1 - y, y)
    }
}
