//! Samplers ported from diffusers 0.42.1 (`schedulers/scheduling_*.py`), each built from the
//! model's own `scheduler_config.json` as `XScheduler.from_config(config)` would build it.

mod config;
mod ddim;
mod dpm;
mod euler;
mod schedule;

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use thiserror::Error;

pub use config::{PredictionType, SchedulerConfig, TimestepSpacing};

/// Errors of sampler names and scheduler configs; each names the key or value at fault.
#[derive(Debug, Error)]
pub enum SamplerError {
    #[error("unknown sampler {0:?}: expected one of ddim, euler, euler_a, dpmpp_2m")]
    UnknownSampler(String),
    #[error("unknown schedule {0:?}: expected normal or karras")]
    UnknownSchedule(String),
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Ddim,
    Euler,
    EulerA,
    DpmPP2M,
}

impl FromStr for SamplerKind {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self, SamplerError> {
        match s {
            "ddim" => Ok(Self::Ddim),
            "euler" => Ok(Self::Euler),
            "euler_a" => Ok(Self::EulerA),
            "dpmpp_2m" => Ok(Self::DpmPP2M),
            other => Err(SamplerError::UnknownSampler(other.into())),
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerA => "euler_a",
            Self::DpmPP2M => "dpmpp_2m",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Schedule {
    Normal,
    Karras,
}

impl FromStr for Schedule {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self, SamplerError> {
        match s {
            "normal" => Ok(Self::Normal),
            "karras" => Ok(Self::Karras),
            other => Err(SamplerError::UnknownSchedule(other.into())),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Normal => "normal",
            Self::Karras => "karras",
        })
    }
}

/// Supplies Gaussian noise (initial latents, ancestral steps). Tests replay recorded noise.
pub trait NoiseSource {
    fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor>;
}

/// One sampler run over a fixed schedule. Indices `i` count steps of the full schedule.
pub trait Sampler {
    /// What the UNet receives at each step (diffusers' `scheduler.timesteps`, exactly).
    fn timesteps(&self) -> &[f64];
    fn init_noise_sigma(&self) -> f64;
    /// diffusers `scale_model_input` at step `i`.
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> candle_core::Result<Tensor>;
    /// One step from index `i`, given the (guided) model output for `timesteps()[i]`.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> candle_core::Result<Tensor>;
    /// `original` noised to the level of step `i` (img2img start, inpaint blending).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize)
        -> candle_core::Result<Tensor>;
}

/// Build a sampler for `steps` steps. The mapping to diffusers classes:
/// ddim/normal: DDIMScheduler (eta 0); ddim/karras: first-order DPM-Solver++ on Karras sigmas
/// (the same update as DDIM; DDIMScheduler has no Karras option); euler: EulerDiscreteScheduler;
/// euler_a: EulerAncestralDiscreteScheduler (karras: on EulerDiscreteScheduler's Karras
/// sigmas); dpmpp_2m: DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint).
pub fn build_sampler(
    kind: SamplerKind,
    schedule: Schedule,
    cfg: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Sampler>, SamplerError> {
    if steps == 0 || steps > cfg.num_train_timesteps {
        return Err(SamplerError::Invalid(format!(
            "steps {steps} must be between 1 and num_train_timesteps ({})",
            cfg.num_train_timesteps
        )));
    }
    let karras = schedule == Schedule::Karras;
    Ok(match (kind, karras) {
        (SamplerKind::Ddim, false) => Box::new(ddim::Ddim::new(cfg, steps)?),
        (SamplerKind::Ddim, true) => Box::new(dpm::DpmSolver::new(cfg, steps, 1, true)?),
        (SamplerKind::Euler, k) => Box::new(euler::Euler::new(cfg, steps, k, false)?),
        (SamplerKind::EulerA, k) => Box::new(euler::Euler::new(cfg, steps, k, true)?),
        (SamplerKind::DpmPP2M, k) => Box::new(dpm::DpmSolver::new(cfg, steps, 2, k)?),
    })
}

/// diffusers img2img: `init_timestep = min(int(steps * strength), steps)`,
/// `t_start = max(steps - init_timestep, 0)`: the first schedule index that runs.
pub fn img2img_start_index(steps: usize, strength: f64) -> usize {
    let init = ((steps as f64 * strength) as usize).min(steps);
    steps.saturating_sub(init)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_listed() {
        for s in ["ddim", "euler", "euler_a", "dpmpp_2m"] {
            assert_eq!(s.parse::<SamplerKind>().unwrap().to_string(), s);
        }
        let e = "plms".parse::<SamplerKind>().unwrap_err().to_string();
        assert!(e.contains("plms") && e.contains("dpmpp_2m"), "{e}");
        assert!("exponential"
            .parse::<Schedule>()
            .unwrap_err()
            .to_string()
            .contains("karras"));
    }

    #[test]
    fn img2img_start_follows_diffusers() {
        assert_eq!(img2img_start_index(4, 0.6), 2);
        assert_eq!(img2img_start_index(4, 0.75), 1);
        assert_eq!(img2img_start_index(20, 1.0), 0);
        assert_eq!(img2img_start_index(4, 0.1), 4);
    }
}
