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
mod error;
mod euler;
mod sampler;
mod schedule;

use std::fmt;
use std::str::FromStr;

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use error::SamplerError;
pub use sampler::{NoiseSource, Sampler};
pub use schedule::alphas_cumprod;

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
