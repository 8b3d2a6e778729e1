//! `scheduler_config.json`: the keys a file sets, with each target class's defaults for the
//! rest. diffusers' `XScheduler.from_config(file)` takes the file's keys and the *target*
//! class's `__init__` defaults for absent ones (not the source `_class_name`'s), so fields whose
//! default differs between DDIM and the others stay `Option` here.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use sd_plugins_api::number::Range;
use serde::Deserialize;

use super::error::SamplerError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

impl FromStr for PredictionType {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self, SamplerError> {
        match s {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            other => Err(bad(
                "<argument>",
                "prediction_type",
                other,
                if other == "sample" {
                    "unsupported"
                } else {
                    "unknown"
                },
                "expected epsilon or v_prediction",
            )),
        }
    }
}

impl fmt::Display for PredictionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

fn bad(path: &str, key: &str, value: &str, problem: &'static str, note: &str) -> SamplerError {
    SamplerError::Config {
        path: path.to_string(),
        key: key.to_string(),
        value: format!("{value:?}"),
        problem,
        note: if note.is_empty() {
            String::new()
        } else {
            format!(" ({note})")
        },
    }
}

#[derive(Debug, Default, Deserialize)]
struct Raw {
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    trained_betas: Option<Vec<f64>>,
    prediction_type: Option<String>,
    timestep_spacing: Option<String>,
    steps_offset: Option<usize>,
    set_alpha_to_one: Option<bool>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    original_inference_steps: Option<usize>,
    timestep_scaling: Option<f64>,
    // Accepted only at their defaults: anything else changes results in ways not ported.
    thresholding: Option<bool>,
    rescale_betas_zero_snr: Option<bool>,
    interpolation_type: Option<String>,
    timestep_type: Option<String>,
    lambda_min_clipped: Option<f64>,
    variance_type: Option<String>,
}

/// A parsed scheduler config. Fields whose default differs per target class stay optional.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// `None`: the target class's default (leading for DDIM, linspace for the others).
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    /// DDIM only; `None` means DDIM's default, true.
    pub set_alpha_to_one: Option<bool>,
    /// DDIM only; `None` means DDIM's default, true.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// Karras bounds; `None`: the schedule's own ends. diffusers keeps these keys in every
    /// scheduler's config, and `_convert_to_karras` reads them wherever they are.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// LCM only: the distillation schedule's length (default 50).
    pub original_inference_steps: Option<usize>,
    /// LCM only: the boundary-condition timestep scale (default 10).
    pub timestep_scaling: Option<f64>,
}

impl Default for SchedulerConfig {
    /// Every key absent: diffusers' `__init__` defaults.
    fn default() -> Self {
        Self::from_json_str("{}").expect("the empty config parses")
    }
}

impl SchedulerConfig {
    /// Read `scheduler_config.json`; errors name `path`.
    pub fn from_file(path: &Path) -> Result<Self, SamplerError> {
        let name = path.display().to_string();
        if let Err(source) = std::fs::metadata(path) {
            return Err(SamplerError::Read {
                path: name.clone(),
                source,
            });
        }
        // a regular file, bounded in size and nesting
        let text =
            sd_plugins_api::config_text::read_config(path).map_err(|m| SamplerError::Value {
                path: name.clone(),
                key: String::new(),
                message: sd_plugins_api::config_text::without_path(path, &m).to_string(),
            })?;
        Self::parse(&text, &name)
    }

    pub fn from_json_str(text: &str) -> Result<Self, SamplerError> {
        Self::parse(text, "<scheduler config>")
    }

    fn parse(text: &str, path: &str) -> Result<Self, SamplerError> {
        let json = |source| SamplerError::Json {
            path: path.to_string(),
            source,
        };
        // serde reads a struct from a list too (`[]`): only an object is a config
        let value: serde_json::Value = serde_json::from_str(text).map_err(json)?;
        if !value.is_object() {
            return Err(SamplerError::Value {
                path: path.to_string(),
                key: String::new(),
                message: "expected a JSON object {\"key\": value, ...}".into(),
            });
        }
        let raw: Raw = serde_json::from_str(text).map_err(json)?;
        // numbers: finite and in range (a negative beta gives a black image)
        let range = |key: &str, x: f64, r: Range| {
            r.check(x)
                .map(|_| ())
                .map_err(|message| SamplerError::Value {
                    path: path.to_string(),
                    key: key.to_string(),
                    message,
                })
        };
        let beta = Range::open(0.0, 1.0);
        for (key, x) in [("beta_start", raw.beta_start), ("beta_end", raw.beta_end)] {
            if let Some(x) = x {
                range(key, x, beta)?;
            }
        }
        for (i, b) in raw.trained_betas.iter().flatten().enumerate() {
            range(&format!("trained_betas[{i}]"), *b, beta)?;
        }
        if let Some(x) = raw.clip_sample_range {
            range("clip_sample_range", x, Range::above(0.0))?;
        }
        let unsupported =
            |key: &str, value: &str, note: &str| Err(bad(path, key, value, "unsupported", note));
        if raw.thresholding == Some(true) {
            return unsupported("thresholding", "true", "dynamic thresholding is not ported");
        }
        if raw.rescale_betas_zero_snr == Some(true) {
            return unsupported(
                "rescale_betas_zero_snr",
                "true",
                "zero-SNR rescaling is not ported",
            );
        }
        if let Some(v) = raw.interpolation_type.as_deref().filter(|&v| v != "linear") {
            return unsupported("interpolation_type", v, "only linear is ported");
        }
        if let Some(v) = raw.timestep_type.as_deref().filter(|&v| v != "discrete") {
            return unsupported("timestep_type", v, "only discrete is ported");
        }
        if let Some(v) = raw.variance_type.as_deref() {
            return unsupported("variance_type", v, "learned variance is not ported");
        }
        if let Some(v) = raw.lambda_min_clipped.filter(|v| v.is_finite()) {
            return unsupported("lambda_min_clipped", &v.to_string(), "only -inf is ported");
        }
        let beta_schedule = match raw.beta_schedule.as_deref().unwrap_or("linear") {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            other => {
                return Err(bad(
                    path,
                    "beta_schedule",
                    other,
                    "unknown",
                    "expected linear, scaled_linear or squaredcos_cap_v2",
                ))
            }
        };
        let prediction_type = match raw.prediction_type.as_deref() {
            None => PredictionType::Epsilon,
            Some(v) => v.parse().map_err(|e| match e {
                SamplerError::Config {
                    key,
                    value,
                    problem,
                    note,
                    ..
                } => SamplerError::Config {
                    path: path.to_string(),
                    key,
                    value,
                    problem,
                    note,
                },
                e => e,
            })?,
        };
        let timestep_spacing = match raw.timestep_spacing.as_deref() {
            None => None,
            Some("linspace") => Some(TimestepSpacing::Linspace),
            Some("leading") => Some(TimestepSpacing::Leading),
            Some("trailing") => Some(TimestepSpacing::Trailing),
            Some(other) => {
                return Err(bad(
                    path,
                    "timestep_spacing",
                    other,
                    "unknown",
                    "expected linspace, leading or trailing",
                ))
            }
        };
        let num_train_timesteps = raw.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps < 2 {
            return Err(bad(
                path,
                "num_train_timesteps",
                &num_train_timesteps.to_string(),
                "invalid",
                "at least 2",
            ));
        }
        if let Some(b) = &raw.trained_betas {
            if b.len() != num_train_timesteps {
                return Err(bad(
                    path,
                    "trained_betas",
                    &format!("[{} values]", b.len()),
                    "invalid",
                    &format!("one per train timestep, {num_train_timesteps}"),
                ));
            }
        }
        for (key, v) in [
            ("sigma_min", raw.sigma_min),
            ("sigma_max", raw.sigma_max),
            ("timestep_scaling", raw.timestep_scaling),
        ] {
            if let Some(v) = v {
                range(key, v, Range::above(0.0))?;
            }
        }
        if let Some(o) = raw.original_inference_steps {
            if o == 0 || o > num_train_timesteps {
                return Err(bad(
                    path,
                    "original_inference_steps",
                    &o.to_string(),
                    "invalid",
                    &format!("between 1 and num_train_timesteps, {num_train_timesteps}"),
                ));
            }
        }
        Ok(Self {
            num_train_timesteps,
            beta_start: raw.beta_start.unwrap_or(0.0001),
            beta_end: raw.beta_end.unwrap_or(0.02),
            beta_schedule,
            trained_betas: raw.trained_betas,
            prediction_type,
            timestep_spacing,
            steps_offset: raw.steps_offset.unwrap_or(0),
            set_alpha_to_one: raw.set_alpha_to_one,
            clip_sample: raw.clip_sample,
            clip_sample_range: raw.clip_sample_range.unwrap_or(1.0),
            sigma_min: raw.sigma_min,
            sigma_max: raw.sigma_max,
            original_inference_steps: raw.original_inference_steps,
            timestep_scaling: raw.timestep_scaling,
        })
    }

    /// The spacing a sampler class uses: the file's, else the class default.
    pub(crate) fn spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_keys_keep_target_defaults() {
        let c = SchedulerConfig::from_json_str(
            r#"{"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "steps_offset": 1, "skip_prk_steps": true}"#,
        )
        .unwrap();
        assert_eq!(c.timestep_spacing, None);
        assert_eq!(
            c.spacing_or(TimestepSpacing::Linspace),
            TimestepSpacing::Linspace
        );
        assert_eq!(c.set_alpha_to_one, None);
        assert_eq!(c.prediction_type, PredictionType::Epsilon);
        assert_eq!(c.steps_offset, 1);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = SchedulerConfig::from_json_str(r#"{"beta_schedule": "foo"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta_schedule") && e.contains("foo"), "{e}");
        let e = SchedulerConfig::from_json_str(r#"{"prediction_type": "sample"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prediction_type") && e.contains("<scheduler config>"),
            "{e}"
        );
        let e = SchedulerConfig::from_json_str(r#"{"thresholding": true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("thresholding"), "{e}");
    }
}
