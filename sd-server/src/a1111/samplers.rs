//! A1111's sampler and scheduler names for sdctl's samplers and schedules.

use sd_pipeline::samplers::{SamplerKind, Schedule};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};

struct Sampler {
    name: &'static str,
    aliases: &'static [&'static str],
    kind: SamplerKind,
    /// What A1111's "automatic" scheduler is for it (`sd_samplers_kdiffusion.py` options).
    automatic: Schedule,
}

const SAMPLERS: &[Sampler] = &[
    Sampler {
        name: "DPM++ 2M",
        aliases: &["k_dpmpp_2m"],
        kind: SamplerKind::DpmPP2M,
        automatic: Schedule::Karras,
    },
    Sampler {
        name: "DPM++ SDE",
        aliases: &["k_dpmpp_sde"],
        kind: SamplerKind::DpmPPSde,
        automatic: Schedule::Karras,
    },
    Sampler {
        name: "DPM++ 2M SDE",
        aliases: &["k_dpmpp_2m_sde"],
        kind: SamplerKind::DpmPP2MSde,
        automatic: Schedule::Exponential,
    },
    Sampler {
        name: "Euler a",
        aliases: &["k_euler_a", "k_euler_ancestral"],
        kind: SamplerKind::EulerA,
        automatic: Schedule::Normal,
    },
    Sampler {
        name: "Euler",
        aliases: &["k_euler"],
        kind: SamplerKind::Euler,
        automatic: Schedule::Normal,
    },
    Sampler {
        name: "LMS",
        aliases: &["k_lms"],
        kind: SamplerKind::Lms,
        automatic: Schedule::Normal,
    },
    Sampler {
        name: "Heun",
        aliases: &["k_heun"],
        kind: SamplerKind::Heun,
        automatic: Schedule::Normal,
    },
    Sampler {
        name: "DDIM",
        aliases: &["ddim"],
        kind: SamplerKind::Ddim,
        automatic: Schedule::Normal,
    },
    Sampler {
        name: "UniPC",
        aliases: &["unipc"],
        kind: SamplerKind::UniPc,
        automatic: Schedule::Normal,
    },
    Sampler {
        name: "LCM",
        aliases: &["k_lcm"],
        kind: SamplerKind::Lcm,
        automatic: Schedule::Normal,
    },
];

/// `(name, label)` of the schedulers sdctl has (A1111's `sd_schedulers.py` names).
const SCHEDULERS: &[(&str, &str, Option<Schedule>)] = &[
    ("automatic", "Automatic", None),
    ("karras", "Karras", Some(Schedule::Karras)),
    ("exponential", "Exponential", Some(Schedule::Exponential)),
    ("sgm_uniform", "SGM Uniform", Some(Schedule::SgmUniform)),
    ("simple", "Simple", Some(Schedule::Simple)),
    ("normal", "Normal", Some(Schedule::Normal)),
    ("beta", "Beta", Some(Schedule::Beta)),
];

/// A request's `sampler_name` (a name or an alias, any case; A1111's old "NAME Karras" form too)
/// and `scheduler`. An unknown sampler is A1111's 400 "Sampler not found".
pub fn resolve(sampler: &str, scheduler: &str) -> ApiResult<(SamplerKind, Schedule)> {
    let want = sampler.trim().to_lowercase();
    let (base, karras) = match want.strip_suffix(" karras") {
        Some(b) => (b.to_string(), true),
        None => (want.clone(), false),
    };
    let s = SAMPLERS
        .iter()
        .find(|s| s.name.to_lowercase() == base || s.aliases.contains(&base.as_str()))
        .ok_or_else(|| {
            ApiError::bad(format!(
                "Sampler not found: sampler_name {sampler:?} (sdctl has {})",
                SAMPLERS
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let want_sched = scheduler.trim().to_lowercase();
    let schedule = match SCHEDULERS
        .iter()
        .find(|(n, l, _)| *n == want_sched || l.to_lowercase() == want_sched)
    {
        _ if want_sched.is_empty() && karras => Schedule::Karras,
        Some((_, _, None)) if karras => Schedule::Karras,
        Some((_, _, None)) => s.automatic,
        Some((_, _, Some(sched))) => *sched,
        None if want_sched.is_empty() => s.automatic,
        None => {
            return Err(ApiError::bad(format!(
                "Scheduler not found: scheduler {scheduler:?} (sdctl has {})",
                SCHEDULERS
                    .iter()
                    .map(|s| s.0)
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    Ok((s.kind, schedule))
}

/// `GET /sdapi/v1/samplers`
pub fn list() -> Value {
    Value::Array(
        SAMPLERS
            .iter()
            .map(|s| {
                // sd_samplers_kdiffusion.py's options
                let mut options = serde_json::Map::new();
                if s.automatic != Schedule::Normal {
                    options.insert("scheduler".into(), s.automatic.name().into());
                }
                if matches!(s.kind, SamplerKind::Heun | SamplerKind::DpmPPSde) {
                    options.insert("second_order".into(), true.into());
                }
                if matches!(s.kind, SamplerKind::DpmPPSde | SamplerKind::DpmPP2MSde) {
                    options.insert("brownian_noise".into(), true.into());
                }
                json!({"name": s.name, "aliases": s.aliases, "options": options})
            })
            .collect(),
    )
}

/// `GET /sdapi/v1/schedulers`
pub fn schedulers() -> Value {
    Value::Array(
        SCHEDULERS
            .iter()
            .map(|(name, label, s)| {
                json!({"name": name, "label": label, "aliases": null,
                       "default_rho": if *s == Some(Schedule::Karras) { 7.0 } else { -1.0 },
                       "need_inner_model": false})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_aliases_and_automatic_schedules() {
        use SamplerKind::*;
        assert_eq!(
            resolve("Euler a", "automatic").unwrap(),
            (EulerA, Schedule::Normal)
        );
        assert_eq!(
            resolve("k_euler_a", "").unwrap(),
            (EulerA, Schedule::Normal)
        );
        assert_eq!(
            resolve("DPM++ 2M", "automatic").unwrap(),
            (DpmPP2M, Schedule::Karras)
        );
        assert_eq!(
            resolve("DPM++ 2M", "normal").unwrap(),
            (DpmPP2M, Schedule::Normal)
        );
        assert_eq!(
            resolve("DPM++ 2M Karras", "").unwrap(),
            (DpmPP2M, Schedule::Karras)
        );
        assert_eq!(
            resolve("euler", "Karras").unwrap(),
            (Euler, Schedule::Karras)
        );
        assert_eq!(
            resolve("DDIM", "automatic").unwrap(),
            (Ddim, Schedule::Normal)
        );
        assert_eq!(
            resolve("DPM++ 2M SDE", "automatic").unwrap(),
            (DpmPP2MSde, Schedule::Exponential)
        );
        assert_eq!(
            resolve("k_heun", "SGM Uniform").unwrap(),
            (Heun, Schedule::SgmUniform)
        );
        assert_eq!(resolve("UniPC", "beta").unwrap(), (UniPc, Schedule::Beta));
        let e = resolve("DPM2 a", "automatic").unwrap_err();
        assert!(e.detail.starts_with("Sampler not found"), "{}", e.detail);
        assert_eq!(e.status, 400);
        let e = resolve("Euler", "align_your_steps").unwrap_err();
        assert!(e.detail.starts_with("Scheduler not found"), "{}", e.detail);
        assert_eq!(list().as_array().unwrap().len(), SAMPLERS.len());
    }
}
