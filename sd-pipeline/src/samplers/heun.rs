//! The two-evaluation samplers: Heun (diffusers `HeunDiscreteScheduler`) and DPM++ SDE
//! (`DPMSolverSDEScheduler`). Both interleave their schedule as diffusers does: `2n - 1` model
//! calls for `n` steps, timesteps `[t0, t1', t1, t2', t2, ...]` and sigmas
//! `[s0, s1, s1, ..., s(n-1), s(n-1), 0]`; even indices take a first-order step, odd ones the
//! second-order correction of the step before. [`Sampler::order`] is 2 (img2img starts at index
//! `2 * start`, as diffusers' `t_start * scheduler.order`).

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig};
use super::error::SamplerError;
use super::euler::{denoised, with_final_zero};
use super::sampler::{scale_by_sigma, NoiseSource, Sampler};
use super::schedule::{discrete_sigmas, log_sigmas, sigma_to_t, train_sigmas, Conversion};

/// `[s0, s1, s1, ..., s(n-1), s(n-1), 0]` from `[s0, ..., s(n-1), 0]` (`repeat_interleave(2)`
/// of the inner sigmas).
fn interleave_sigmas(s: &[f32]) -> Vec<f32> {
    let n = s.len();
    let mut out = vec![s[0]];
    for &v in &s[1..n - 1] {
        out.extend([v, v]);
    }
    out.push(s[n - 1]);
    out
}

fn past_end(i: usize, n: usize, what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("step index {i} is past the {n} {what} model calls"))
}

/// What a first-order step leaves for the second-order one.
struct Heun1 {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

pub struct Heun {
    /// float32 timesteps, interleaved.
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    first: Option<Heun1>,
}

impl Heun {
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        conv: Option<Conversion>,
    ) -> std::result::Result<Self, SamplerError> {
        let (ts, sigmas) = discrete_sigmas(cfg, steps, conv, true, true);
        let (sigmas, init_noise_sigma) = with_final_zero(cfg, sigmas);
        // torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]), as float32
        let mut timesteps = vec![ts[0] as f32 as f64];
        for &t in &ts[1..] {
            timesteps.extend([t as f32 as f64; 2]);
        }
        Ok(Self {
            timesteps,
            sigmas: interleave_sigmas(&sigmas),
            init_noise_sigma,
            prediction: cfg.prediction_type,
            first: None,
        })
    }
}

impl Sampler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = *self
            .sigmas
            .get(i)
            .filter(|_| i < self.timesteps.len())
            .ok_or_else(|| past_end(i, self.timesteps.len(), "Heun"))?;
        scale_by_sigma(sample, s)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            return Err(past_end(i, self.timesteps.len(), "Heun"));
        }
        // scheduling_heun_discrete.py step (gamma 0: sigma_hat = sigma), float32 scalars
        match self.first.take() {
            None => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = denoised(self.prediction, model_output, sample, sigma)?;
                let derivative = ((sample - x0)? / sigma as f64)?;
                let dt = next - sigma;
                let out = (sample + (&derivative * dt as f64)?)?;
                self.first = Some(Heun1 {
                    derivative,
                    dt,
                    sample: sample.clone(),
                });
                Ok(out)
            }
            Some(h) => {
                let next = self.sigmas[i];
                let x0 = denoised(self.prediction, model_output, sample, next)?;
                let d = ((sample - x0)? / next as f64)?;
                let d = ((h.derivative + d)? / 2.0)?;
                h.sample + (d * h.dt as f64)?
            }
        }
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            return Err(past_end(i, self.timesteps.len(), "Heun"));
        }
        original + (noise * self.sigmas[i] as f64)?
    }
}

/// What the first stage of a DPM++ SDE step leaves for the second.
struct Sde1 {
    sample: Tensor,
    /// `sigma_fn(t_proposed)`, the midpoint the model is evaluated at next.
    mid: f32,
    /// The first stage's Brownian increment over `[mid, sigma]`, normalised.
    z: Tensor,
    sigma: f32,
}

/// DPM-Solver++ (stochastic, 2nd order, midpoint) from k-diffusion via diffusers
/// `DPMSolverSDEScheduler`. Its noise: diffusers samples a Brownian tree (torchsde) at
/// `(sigma, mid)` for the first stage and `(sigma, sigma_next)` for the second; here the same
/// Brownian motion is built from two standard normal draws of the run's noise source per
/// step: `z1` for `[mid, sigma]`, and `(sqrt(sigma - mid) z1 + sqrt(mid - next) z2) /
/// sqrt(sigma - next)` for the second stage, so the two stages' noises are correlated as
/// the tree's are. (torchsde's own draws are not reproduced bit for bit.)
pub struct DpmSde {
    /// Interleaved: step timesteps at even indices, midpoint timesteps at odd ones (float64).
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    first: Option<Sde1>,
}

impl DpmSde {
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        conv: Option<Conversion>,
    ) -> std::result::Result<Self, SamplerError> {
        // np.linspace(..., dtype=float): a float64 grid, timesteps kept as float64
        let (ts, sigmas) = discrete_sigmas(cfg, steps, conv, true, false);
        // _second_order_timesteps: midpoints in t = -log(sigma), float64
        let log_train = log_sigmas(&train_sigmas(&super::schedule::alphas_cumprod(cfg)));
        let mids: Vec<f64> = sigmas
            .windows(2)
            .map(|w| {
                let (t0, t1) = (-w[0].ln(), -w[1].ln());
                sigma_to_t((-(t0 + (t1 - t0) * 0.5)).exp(), &log_train)
            })
            .collect();
        let mut timesteps = vec![ts[0]];
        for (k, &t) in ts[1..].iter().enumerate() {
            timesteps.extend([mids[k], t]);
        }
        let (sigmas, init_noise_sigma) = with_final_zero(cfg, sigmas);
        Ok(Self {
            timesteps,
            sigmas: interleave_sigmas(&sigmas),
            init_noise_sigma,
            prediction: cfg.prediction_type,
            first: None,
        })
    }
}

impl Sampler for DpmSde {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            return Err(past_end(i, self.timesteps.len(), "DPM++ SDE"));
        }
        let s = match &self.first {
            None => self.sigmas[i],
            Some(f) => f.mid,
        };
        scale_by_sigma(sample, s)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            return Err(past_end(i, self.timesteps.len(), "DPM++ SDE"));
        }
        // scheduling_dpmsolver_sde.py step, float32 0-d tensor arithmetic, s_noise 1
        let first = self.first.take();
        let (sigma, next) = match first {
            None => (self.sigmas[i], self.sigmas[i + 1]),
            Some(_) => (self.sigmas[i - 1], self.sigmas[i]),
        };
        let sigma_fn = |t: f32| (-t).exp();
        let t_fn = |s: f32| -s.ln();
        let (t, t_next) = (t_fn(sigma), t_fn(next));
        let t_proposed = t + (t_next - t) * 0.5;
        let sigma_input = match first {
            None => sigma,
            Some(_) => sigma_fn(t_proposed),
        };
        let x0 = denoised(self.prediction, model_output, sample, sigma_input)?;
        if next == 0.0 {
            let derivative = ((sample - x0)? / sigma as f64)?;
            return sample + (derivative * (next - sigma) as f64)?;
        }
        let (t_next, base) = match &first {
            None => (t_proposed, sample.clone()),
            Some(f) => (t_next, f.sample.clone()),
        };
        let (from, to) = (sigma_fn(t), sigma_fn(t_next));
        let sigma_up = to.min((to * to * (from * from - to * to) / (from * from)).sqrt());
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let ancestral_t = t_fn(sigma_down);
        let prev = ((&base * (sigma_fn(ancestral_t) / sigma_fn(t)) as f64)?
            - (x0 * (t - ancestral_t).exp_m1() as f64)?)?;
        let z = noise
            .randn(sample.dims(), sample.device())?
            .to_dtype(sample.dtype())?;
        let w = match &first {
            None => z.clone(),
            Some(f) => {
                // W(next) - W(sigma) = [W(mid) - W(sigma)] + [W(next) - W(mid)]
                let a = (&f.z * ((f.sigma - f.mid).abs().sqrt()) as f64)?;
                let b = (&z * ((f.mid - to).abs().sqrt()) as f64)?;
                ((a + b)? / ((f.sigma - to).abs().sqrt()) as f64)?
            }
        };
        let out = (prev + (w * sigma_up as f64)?)?;
        if first.is_none() {
            self.first = Some(Sde1 {
                sample: base,
                mid: to,
                z,
                sigma: from,
            });
        }
        Ok(out)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            return Err(past_end(i, self.timesteps.len(), "DPM++ SDE"));
        }
        original + (noise * self.sigmas[i] as f64)?
    }
}
