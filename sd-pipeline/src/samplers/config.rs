//! `scheduler_config.json`: the keys a file sets, with each target class's defaults for the
//! rest (diffusers' `from_config` drops the source class's own defaults, `_use_default_values`).

use std::path::Path;

use serde::Deserialize;

use super::SamplerError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
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
    thresholding: Option<bool>,
    rescale_betas_zero_snr: Option<bool>,
}

/// A parsed scheduler config. Fields that differ per target class stay optional.
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
    /// DDIM only; default true there.
    pub set_alpha_to_one: Option<bool>,
    /// DDIM only; default true there.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self, SamplerError> {
        let text = std::fs::read_to_string(path).map_err(|e| SamplerError::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn from_json_str(text: &str) -> Result<Self, SamplerError> {
        Self::parse(text, "<scheduler config>")
    }

    fn parse(text: &str, path: &str) -> Result<Self, SamplerError> {
        let err = |message: String| SamplerError::Config {
            path: path.to_string(),
            message,
        };
        let raw: Raw = serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        if raw.thresholding == Some(true) {
            return Err(err("`thresholding` = true is not supported".into()));
        }
        if raw.rescale_betas_zero_snr == Some(true) {
            return Err(err(
                "`rescale_betas_zero_snr` = true is not supported".into()
            ));
        }
        let beta_schedule = match raw.beta_schedule.as_deref().unwrap_or("linear") {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            other => return Err(err(format!("unsupported `beta_schedule` = {other:?}"))),
        };
        let prediction_type = match raw.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            other => return Err(err(format!("unsupported `prediction_type` = {other:?}"))),
        };
        let timestep_spacing = match raw.timestep_spacing.as_deref() {
            None => None,
            Some("linspace") => Some(TimestepSpacing::Linspace),
            Some("leading") => Some(TimestepSpacing::Leading),
            Some("trailing") => Some(TimestepSpacing::Trailing),
            Some(other) => return Err(err(format!("unsupported `timestep_spacing` = {other:?}"))),
        };
        let num_train_timesteps = raw.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps < 2 {
            return Err(err(format!(
                "`num_train_timesteps` = {num_train_timesteps} is too small"
            )));
        }
        if let Some(b) = &raw.trained_betas {
            if b.len() != num_train_timesteps {
                return Err(err(format!(
                    "`trained_betas` has {} values for {num_train_timesteps} timesteps",
                    b.len()
                )));
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
        assert!(e.contains("prediction_type"), "{e}");
    }
}
