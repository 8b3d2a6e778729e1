//! Samplers ported from diffusers 0.42.1 (`schedulers/scheduling_*.py`), each built from the
//! model's own `scheduler_config.json` as `XScheduler.from_config(config)` would build it.
//!
//! Scalar arithmetic follows diffusers' dtypes: schedules in numpy float64 where numpy does it,
//! per-step coefficients in float32 where torch does it (0-d float32 tensors), tensor updates
//! with candle ops on whatever device the latents live on.
//!
//! What the UNet is fed (`Sampler::timesteps`): DDIM and DPM-Solver (ddim, dpmpp_2m, and
//! ddim/karras) feed integer (int64) timesteps; Euler and Euler a feed float32 timesteps, which
//! are fractional with Karras sigmas (e.g. 978.7512). Both are held here as exact f64.

mod config;
mod ddim;
mod dpm;
mod euler;
mod schedule;

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use thiserror::Error;

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use schedule::alphas_cumprod;

/// Errors of sampler names and scheduler configs; each names the file, key and value at fault.
#[derive(Debug, Error)]
pub enum SamplerError {
    #[error("unknown sampler {name:?}: expected one of ddim, euler, euler_a, dpmpp_2m")]
    UnknownSampler { name: String },
    #[error("unknown schedule {name:?}: expected normal or karras")]
    UnknownSchedule { name: String },
    #[error("cannot read scheduler config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid JSON in scheduler config {path}: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    /// A key of a scheduler config holds a value we cannot use, e.g.
    /// `unknown beta_schedule "foo" in scheduler/scheduler_config.json (expected ...)`.
    #[error("{problem} {key} {value} in {path}{note}")]
    Config {
        path: String,
        key: String,
        value: String,
        /// "unknown", "unsupported" or "invalid".
        problem: &'static str,
        /// Empty or ` (...)` with what would be accepted.
        note: String,
    },
    /// A parameter out of range (steps).
    #[error("{0}")]
    Invalid(String),
}

/// The samplers offered, by their user-facing names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Ddim,
    Euler,
    EulerA,
    DpmPP2M,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 4] = [Self::Ddim, Self::Euler, Self::EulerA, Self::DpmPP2M];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerA => "euler_a",
            Self::DpmPP2M => "dpmpp_2m",
        }
    }
}

impl FromStr for SamplerKind {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self, SamplerError> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| SamplerError::UnknownSampler { name: s.into() })
    }
}

impl SamplerKind {
    /// Parse a sampler as people type it: our names (`dpmpp_2m`), A1111's (`"DPM++ 2M Karras"`,
    /// `"Euler a"`, `"DDIM"`), ComfyUI's (`euler_ancestral`) and diffusers class names
    /// (`DPMSolverMultistepScheduler`). A trailing "Karras" also names the schedule.
    pub fn parse_alias(s: &str) -> Result<(Self, Option<Schedule>), SamplerError> {
        let mut n: String = s
            .to_lowercase()
            .replace("++", "pp")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let mut schedule = None;
        if let Some(stripped) = n.strip_suffix("karras") {
            n = stripped.to_string();
            schedule = Some(Schedule::Karras);
        }
        let kind = match n.as_str() {
            "ddim" | "ddimscheduler" => Self::Ddim,
            "euler" | "eulerdiscretescheduler" | "eulerdiscrete" => Self::Euler,
            "eulera"
            | "eulerancestral"
            | "eulerancestraldiscretescheduler"
            | "eulerancestraldiscrete" => Self::EulerA,
            "dpmpp2m" | "dpmsolvermultistepscheduler" | "dpmsolvermultistep" | "dpmsolverpp2m" => {
                Self::DpmPP2M
            }
            _ => return Err(SamplerError::UnknownSampler { name: s.into() }),
        };
        Ok((kind, schedule))
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The noise levels the steps visit: diffusers' own spacing, or Karras et al.'s (rho 7).
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
            other => Err(SamplerError::UnknownSchedule { name: other.into() }),
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

/// Supplies the per-step noise of ancestral samplers (and anything else random).
/// Tests replay recorded noise through it.
pub trait NoiseSource {
    fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor>;
}

/// One sampler run over a fixed schedule. Indices `i` count steps of the full schedule
/// (diffusers' `step_index` with `set_begin_index`), so an img2img run starts at
/// [`img2img_start_index`] and inpainting re-noises with `add_noise(.., i + 1)` after step `i`.
pub trait Sampler {
    /// Model timesteps (what the UNet receives), one per inference step, in order: exactly
    /// diffusers' `scheduler.timesteps` (int64 for DDIM/DPM-Solver, float32 for Euler/Euler a).
    fn timesteps(&self) -> &[f64];
    /// Standard deviation of the initial txt2img latents (1 for DDIM/DPM-Solver).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers `scale_model_input` for step `i` (index into `timesteps`).
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }
    /// One step from index `i`: `model_output` is the (guided) UNet output for `timesteps()[i]`.
    /// Multistep samplers remember earlier outputs: call it for consecutive `i`.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> candle_core::Result<Tensor>;
    /// `original` noised to the level of step `i` (img2img start, inpaint blending): DDIM uses
    /// `alphas_cumprod[timesteps[i]]`, the sigma samplers `sigmas[i]`. `i` must be below
    /// `timesteps().len()` (diffusers' inpainting skips the blend after the last step).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize)
        -> candle_core::Result<Tensor>;
}

/// Build a sampler for `steps` steps. The mapping to diffusers classes:
/// - ddim/normal: `DDIMScheduler` (eta 0);
/// - ddim/karras: `DPMSolverMultistepScheduler(solver_order=1, use_karras_sigmas=True)`
///   (first-order DPM-Solver++ is DDIM; DDIMScheduler has no Karras option);
/// - euler: `EulerDiscreteScheduler[(use_karras_sigmas=True)]`;
/// - euler_a/normal: `EulerAncestralDiscreteScheduler`; euler_a/karras: the same on the sigmas
///   and timesteps `EulerDiscreteScheduler(use_karras_sigmas=True)` computes;
/// - dpmpp_2m: `DPMSolverMultistepScheduler[(use_karras_sigmas=True)]` with its defaults
///   (dpmsolver++, order 2, midpoint, lower_order_final, final sigma 0).
///
/// The sampler kind and schedule decide the algorithm: a config's own `use_karras_sigmas`,
/// `solver_order`, `algorithm_type`, `final_sigmas_type` ... are not consulted.
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

/// diffusers img2img (`StableDiffusionImg2ImgPipeline.get_timesteps`):
/// `init_timestep = min(int(steps * strength), steps)`, `t_start = max(steps - init_timestep, 0)`.
/// The loop runs from index `t_start`, and the start latents are `add_noise(.., t_start)`.
pub fn img2img_start_index(steps: usize, strength: f64) -> usize {
    let init = ((steps as f64 * strength) as usize).min(steps);
    steps.saturating_sub(init)
}

#[cfg(test)]
mod alias_tests {
    use super::*;

    #[test]
    fn names_people_type() {
        let p = |s: &str| SamplerKind::parse_alias(s).unwrap();
        assert_eq!(
            p("DPM++ 2M Karras"),
            (SamplerKind::DpmPP2M, Some(Schedule::Karras))
        );
        assert_eq!(p("dpmpp_2m"), (SamplerKind::DpmPP2M, None));
        assert_eq!(p("Euler a"), (SamplerKind::EulerA, None));
        assert_eq!(p("euler_ancestral"), (SamplerKind::EulerA, None));
        assert_eq!(p("EulerDiscreteScheduler"), (SamplerKind::Euler, None));
        assert_eq!(p("DDIM"), (SamplerKind::Ddim, None));
        assert_eq!(
            p("DPMSolverMultistepScheduler"),
            (SamplerKind::DpmPP2M, None)
        );
        assert!(SamplerKind::parse_alias("PLMS")
            .unwrap_err()
            .to_string()
            .contains("PLMS"));
    }
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
