//! The position of the denoising loop, given to every step hook.

/// Where the loop is. `index` counts scheduler steps from 0 over the *full* schedule, so an
/// img2img run at strength 0.5 with 20 steps sees indices 10..20 (`first_index` = 10).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    pub index: usize,
    pub first_index: usize,
    /// Number of steps of the full schedule.
    pub total: usize,
    /// The timestep the UNet receives at this step.
    pub timestep: f64,
    /// Images generated in parallel (the latent batch, without the CFG copy).
    pub batch: usize,
    /// True when the model input holds an unconditional half (classifier-free guidance).
    pub cfg: bool,
}

impl StepInfo {
    /// Fraction of the schedule done before this step, in [0, 1): the `start`/`end` window of
    /// control units is compared against it (diffusers: `i / len(timesteps)`).
    pub fn fraction(&self) -> f64 {
        self.index as f64 / self.total.max(1) as f64
    }
}
