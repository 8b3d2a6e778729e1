//! The load benchmark: seconds to load a model with its memory-mapped weights.

use std::path::PathBuf;

use candle_core::DType;
use serde::Serialize;

use super::measure::{dtype_name, peak_rss_bytes, timed};
use crate::error::Result;

/// What to load, how often, where.
#[derive(Clone, Debug)]
pub struct LoadBench {
    /// A diffusers folder or a single-file checkpoint.
    pub model: PathBuf,
    /// Timed loads after the first (which may read from disk); at least 1.
    pub iters: usize,
    /// A device name (`cpu`, `cuda`, `cuda:1`, ...).
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
}

/// Seconds per load, cold and warm, and the process's peak memory.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub model: PathBuf,
    #[serde(serialize_with = "dtype_name")]
    pub dtype: DType,
    pub device: String,
    pub iters: usize,
    /// the first load
    pub first_s: f64,
    /// the later loads
    pub warm_mean_s: f64,
    pub warm_min_s: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl LoadBench {
    /// Load the model once, then `iters` more times.
    pub fn run(&self) -> Result<LoadReport> {
        let device = crate::device::device(&self.device)?;
        let requested = crate::device::dtype(&self.dtype)?;
        let dtype = crate::device::compute_dtype(&device, requested)?;
        let (mean, min, first) = timed(self.iters, &device, &|| {
            sd_pipeline::StableDiffusion::load_with_vae(&self.model, &device, dtype, &[], None)?;
            Ok(())
        })?;
        Ok(LoadReport {
            model: self.model.clone(),
            dtype: requested,
            device: self.device.clone(),
            iters: self.iters,
            first_s: first,
            warm_mean_s: mean,
            warm_min_s: min,
            peak_rss_bytes: peak_rss_bytes(),
        })
    }
}
