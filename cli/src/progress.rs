//! A progress bar with it/s, driven by the denoising loop's step hooks.

use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use sd_plugins_api::{Hook, HookError, NoiseLevels, StepInfo};

/// Shows a bar on stderr. Keep a clone of [`Progress::bar`] to read the step count and the
/// sampling time afterwards (`position()`, `elapsed()`).
pub struct Progress {
    bar: ProgressBar,
    started: bool,
}

impl Progress {
    pub fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} sampling [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Self {
            bar,
            started: false,
        }
    }

    pub fn bar(&self) -> ProgressBar {
        self.bar.clone()
    }
}

impl Hook for Progress {
    fn name(&self) -> &str {
        "progress"
    }

    fn before_step(&mut self, step: &StepInfo, _latents: &mut Tensor) -> Result<(), HookError> {
        if !self.started {
            self.started = true;
            self.bar.set_length((step.total - step.first_index) as u64);
            self.bar.reset(); // elapsed() now counts sampling time only
        }
        Ok(())
    }

    fn after_step(
        &mut self,
        _step: &StepInfo,
        _levels: &dyn NoiseLevels,
        _latents: &mut Tensor,
    ) -> Result<(), HookError> {
        self.bar.inc(1);
        Ok(())
    }
}
