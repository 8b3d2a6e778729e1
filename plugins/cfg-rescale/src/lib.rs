//! An example step-hook plugin: CFG rescale ("Common Diffusion Noise Schedules and Sample
//! Steps are Flawed", section 3.4), as diffusers' `rescale_noise_cfg` with
//! `guidance_rescale = phi`:
//!
//! ```text
//! cfg      = uncond + g * (cond - uncond)
//! rescaled = cfg * std(cond) / std(cfg)        (per sample, unbiased std)
//! out      = phi * rescaled + (1 - phi) * cfg
//! ```
//!
//! `phi = 0` is plain CFG: the plugin then leaves the step alone.

use sd_plugins_api::{export_plugin, HookPlugin, ParamSpec, Params, StepInfo, TensorView};

pub struct CfgRescale {
    phi: f64,
}

/// Unbiased standard deviation (torch's default `std`).
fn std(x: &[f32]) -> f64 {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    var.sqrt()
}

impl HookPlugin for CfgRescale {
    fn name() -> &'static str {
        "cfg_rescale"
    }
    fn description() -> &'static str {
        "CFG rescale: keeps high guidance scales from over-saturating (phi = 0 is plain CFG)"
    }
    fn params() -> Vec<ParamSpec> {
        vec![ParamSpec::float(
            "phi",
            0.7,
            0.0,
            1.0,
            "blend between plain CFG (0) and fully rescaled CFG (1)",
        )]
    }
    fn create(params: &Params) -> Result<Self, String> {
        Ok(Self {
            phi: params.float("phi").unwrap_or(0.7),
        })
    }

    fn on_noise_pred(
        &mut self,
        _step: &StepInfo,
        uncond: Option<TensorView<'_>>,
        cond: TensorView<'_>,
        guidance_scale: f64,
    ) -> Result<Option<Vec<f32>>, String> {
        let Some(uncond) = uncond else {
            return Ok(None);
        };
        if self.phi == 0.0 {
            return Ok(None);
        }
        let g = guidance_scale as f32;
        let cfg: Vec<f32> = uncond
            .data
            .iter()
            .zip(cond.data)
            .map(|(&u, &c)| u + (c - u) * g)
            .collect();
        let batch = cond.shape.first().copied().unwrap_or(1).max(1);
        let per = cond.data.len() / batch;
        let mut out = Vec::with_capacity(cfg.len());
        for b in 0..batch {
            let (c, x) = (
                &cond.data[b * per..(b + 1) * per],
                &cfg[b * per..(b + 1) * per],
            );
            let ratio = std(c) / std(x).max(1e-12);
            let phi = self.phi;
            out.extend(
                x.iter()
                    .map(|&v| (phi * (v as f64 * ratio) + (1.0 - phi) * v as f64) as f32),
            );
        }
        Ok(Some(out))
    }
}

export_plugin!(hook: CfgRescale);
