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
mod heun;
mod lcm;
mod lms;
mod sampler;
mod schedule;
mod unipc;

use std::fmt;
use std::str::FromStr;

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use error::SamplerError;
pub use sampler::{NoiseSource, Sampler};
pub use schedule::alphas_cumprod;
use schedule::Conversion;

/// The samplers offered, by their user-facing names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Ddim,
    Euler,
    EulerA,
    DpmPP2M,
    DpmPP2MSde,
    DpmPPSde,
    Heun,
    Lms,
    UniPc,
    Lcm,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 10] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerA,
        Self::DpmPP2M,
        Self::DpmPP2MSde,
        Self::DpmPPSde,
        Self::Heun,
        Self::Lms,
        Self::UniPc,
        Self::Lcm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerA => "euler_a",
            Self::DpmPP2M => "dpmpp_2m",
            Self::DpmPP2MSde => "dpmpp_2m_sde",
            Self::DpmPPSde => "dpmpp_sde",
            Self::Heun => "heun",
            Self::Lms => "lms",
            Self::UniPc => "unipc",
            Self::Lcm => "lcm",
        }
    }

    /// The schedule sdctl uses when none is given: Karras, except for LCM, whose timesteps are
    /// its own.
    pub fn default_schedule(self) -> Schedule {
        match self {
            Self::Lcm => Schedule::Normal,
            _ => Schedule::Karras,
        }
    }

    /// Whether each run draws fresh noise per step (from the run's noise source).
    pub fn is_stochastic(self) -> bool {
        matches!(
            self,
            Self::EulerA | Self::DpmPP2MSde | Self::DpmPPSde | Self::Lcm
        )
    }
}

/// Our sampler names, comma-separated (for messages).
pub fn sampler_names() -> String {
    SamplerKind::ALL.map(|k| k.name()).join(", ")
}

impl FromStr for SamplerKind {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self, SamplerError> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| SamplerError::UnknownSampler {
                name: s.into(),
                expected: sampler_names(),
            })
    }
}

impl SamplerKind {
    /// Parse a sampler as people type it: our names (`dpmpp_2m`), A1111's (`"DPM++ 2M Karras"`,
    /// `"Euler a"`, `"DDIM"`, `"DPM++ 2M SDE"`, `"LMS"`), ComfyUI's (`euler_ancestral`,
    /// `uni_pc`) and diffusers class names (`DPMSolverMultistepScheduler`). A trailing
    /// "Karras" / "Exponential" also names the schedule (A1111 before 1.9).
    pub fn parse_alias(s: &str) -> Result<(Self, Option<Schedule>), SamplerError> {
        let mut n: String = s
            .to_lowercase()
            .replace("++", "pp")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let mut schedule = None;
        for (suffix, sched) in [
            ("karras", Schedule::Karras),
            ("exponential", Schedule::Exponential),
        ] {
            if let Some(stripped) = n.strip_suffix(suffix) {
                n = stripped.to_string();
                schedule = Some(sched);
                break;
            }
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
            "dpmpp2msde" => Self::DpmPP2MSde,
            "dpmppsde" | "dpmsolversdescheduler" | "dpmsolversde" => Self::DpmPPSde,
            "heun" | "heundiscretescheduler" | "heundiscrete" => Self::Heun,
            "lms" | "lmsdiscretescheduler" | "lmsdiscrete" => Self::Lms,
            "unipc" | "unipcmultistepscheduler" | "unipcmultistep" => Self::UniPc,
            "lcm" | "lcmscheduler" => Self::Lcm,
            _ => {
                return Err(SamplerError::UnknownSampler {
                    name: s.into(),
                    expected: sampler_names(),
                })
            }
        };
        Ok((kind, schedule))
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The noise levels the steps visit (A1111's "Schedule type"), as diffusers' scheduler docs map
/// them: `normal` the scheduler's own spacing; `karras` (rho 7), `exponential` and `beta`
/// (alpha = beta = 0.6) redraw the sigmas with linspace spacing (`use_karras_sigmas`,
/// `use_exponential_sigmas`, `use_beta_sigmas`); `sgm_uniform` and `simple` are
/// `timestep_spacing="trailing"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Schedule {
    Normal,
    Karras,
    Exponential,
    Beta,
    SgmUniform,
    Simple,
}

impl Schedule {
    pub const ALL: [Schedule; 6] = [
        Self::Normal,
        Self::Karras,
        Self::Exponential,
        Self::Beta,
        Self::SgmUniform,
        Self::Simple,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
            Self::Beta => "beta",
            Self::SgmUniform => "sgm_uniform",
            Self::Simple => "simple",
        }
    }

    fn conversion(self) -> Option<Conversion> {
        match self {
            Self::Karras => Some(Conversion::Karras),
            Self::Exponential => Some(Conversion::Exponential),
            Self::Beta => Some(Conversion::Beta),
            _ => None,
        }
    }

    /// The `timestep_spacing` the schedule sets; `None`: the config's own.
    fn spacing(self) -> Option<TimestepSpacing> {
        match self {
            Self::Normal | Self::Karras => None,
            Self::Exponential | Self::Beta => Some(TimestepSpacing::Linspace),
            Self::SgmUniform | Self::Simple => Some(TimestepSpacing::Trailing),
        }
    }
}

/// Our schedule names, comma-separated (for messages).
pub fn schedule_names() -> String {
    Schedule::ALL.map(|k| k.name()).join(", ")
}

impl FromStr for Schedule {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self, SamplerError> {
        let n: String = s
            .to_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        Self::ALL
            .into_iter()
            .find(|k| k.name().replace('_', "") == n)
            .ok_or_else(|| SamplerError::UnknownSchedule {
                name: s.into(),
                expected: schedule_names(),
            })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Build a sampler for `steps` steps. The mapping to diffusers classes (each `from_config` of
/// the model's scheduler config, with the schedule's flags):
/// - ddim/normal, sgm_uniform, simple: `DDIMScheduler` (eta 0);
/// - ddim/karras, exponential, beta: `DPMSolverMultistepScheduler(solver_order=1, ...)`
///   (first-order DPM-Solver++ is DDIM; DDIMScheduler has no sigma schedules);
/// - euler: `EulerDiscreteScheduler`; euler_a: `EulerAncestralDiscreteScheduler`, on the
///   sigmas and timesteps `EulerDiscreteScheduler` computes for karras / exponential / beta;
/// - dpmpp_2m: `DPMSolverMultistepScheduler` (dpmsolver++, order 2, midpoint, final sigma 0);
///   dpmpp_2m_sde: the same with `algorithm_type="sde-dpmsolver++"`;
/// - dpmpp_sde: `DPMSolverSDEScheduler`; heun: `HeunDiscreteScheduler`; lms:
///   `LMSDiscreteScheduler`; unipc: `UniPCMultistepScheduler` (bh2, order 2);
/// - lcm: `LCMScheduler` (its own timesteps: normal only).
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
    let mut cfg = cfg.clone();
    if let Some(spacing) = schedule.spacing() {
        cfg.timestep_spacing = Some(spacing);
    }
    let cfg = &cfg;
    let conv = schedule.conversion();
    Ok(match kind {
        SamplerKind::Ddim if conv.is_none() => Box::new(ddim::Ddim::new(cfg, steps)?),
        SamplerKind::Ddim => Box::new(dpm::DpmSolver::new(cfg, steps, 1, conv, false)?),
        SamplerKind::Euler => Box::new(euler::Euler::new(cfg, steps, conv, false)?),
        SamplerKind::EulerA => Box::new(euler::Euler::new(cfg, steps, conv, true)?),
        SamplerKind::DpmPP2M => Box::new(dpm::DpmSolver::new(cfg, steps, 2, conv, false)?),
        SamplerKind::DpmPP2MSde => Box::new(dpm::DpmSolver::new(cfg, steps, 2, conv, true)?),
        SamplerKind::DpmPPSde => Box::new(heun::DpmSde::new(cfg, steps, conv)?),
        SamplerKind::Heun => Box::new(heun::Heun::new(cfg, steps, conv)?),
        SamplerKind::Lms => Box::new(lms::Lms::new(cfg, steps, conv)?),
        SamplerKind::UniPc => Box::new(unipc::UniPc::new(cfg, steps, conv)?),
        SamplerKind::Lcm if schedule == Schedule::Normal => Box::new(lcm::Lcm::new(cfg, steps)?),
        SamplerKind::Lcm => {
            return Err(SamplerError::Invalid(format!(
                "schedule {schedule} does not apply to lcm, which has its own timesteps: use normal"
            )))
        }
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
        for s in SamplerKind::ALL.map(|k| k.name()) {
            assert_eq!(s.parse::<SamplerKind>().unwrap().to_string(), s);
        }
        let e = "plms".parse::<SamplerKind>().unwrap_err().to_string();
        assert!(e.contains("plms") && e.contains("dpmpp_2m"), "{e}");
        assert!("polyexponential"
            .parse::<Schedule>()
            .unwrap_err()
            .to_string()
            .contains("sgm_uniform"));
        assert_eq!(
            "SGM Uniform".parse::<Schedule>().unwrap(),
            Schedule::SgmUniform
        );
    }

    #[test]
    fn img2img_start_follows_diffusers() {
        assert_eq!(img2img_start_index(4, 0.6), 2);
        assert_eq!(img2img_start_index(4, 0.75), 1);
        assert_eq!(img2img_start_index(20, 1.0), 0);
        assert_eq!(img2img_start_index(4, 0.1), 4);
    }
}
