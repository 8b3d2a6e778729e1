//! When a generation produces NaN or infinity ([`sd_pipeline::Error::NonFinite`]: the loop
//! checks the latents after every step), find the input that caused it. The model's weights
//! are not scanned on every load (gigabytes); they are scanned here, on the failure path only:
//! the base model's weight files, a swapped VAE, the ControlNets. LoRAs are checked when they
//! load (`sd_lora::LoraFile::load`).

use std::path::{Path, PathBuf};

use sd_pipeline::loading::files::weight_files;

use crate::error::Error;
use crate::job::Job;

/// The weight files of a model, VAE or ControlNet given as a file or a folder (a diffusers
/// folder's components, or a component folder itself).
fn files_of(path: &Path, components: &[&str]) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = weight_files(path).unwrap_or_default();
    for c in components {
        out.extend(weight_files(&path.join(c)).unwrap_or_default());
    }
    out
}

/// The error for a generation that failed with `e`: a non-finite result names the weight
/// file and tensor that hold NaN or infinity, else the step and the settings; any other
/// error passes through.
pub(crate) fn explain(
    e: sd_pipeline::Error,
    model: &Path,
    loras: &[sd_lora::LoraSpec],
    job: &Job,
) -> Error {
    let sd_pipeline::Error::NonFinite { at } = &e else {
        return e.into();
    };
    let mut inputs: Vec<(String, Vec<PathBuf>)> = vec![(
        "model".into(),
        files_of(model, &["unet", "text_encoder", "vae"]),
    )];
    if let Some(vae) = &job.vae {
        inputs.push(("--vae".into(), files_of(vae, &["vae"])));
    }
    for (i, c) in job.control.iter().enumerate() {
        inputs.push((
            format!("control[{i}] ControlNet"),
            files_of(&c.spec.model, &[]),
        ));
    }
    for (what, files) in inputs {
        for f in files {
            let found = sd_weights::Store::open(&f)
                .ok()
                .and_then(|s| s.first_non_finite().ok().flatten());
            if let Some((tensor, where_)) = found {
                return Error::Message(format!(
                    "{at} hold NaN or infinity: the {what} file {} has tensor {tensor} \
                     holding {where_}; nothing written",
                    f.display()
                ));
            }
        }
    }
    let mut settings = vec![format!("cfg_scale {}", job.cfg_scale)];
    if !loras.is_empty() {
        let l: Vec<String> = loras
            .iter()
            .map(|l| format!("{} at {}/{}", l.path.display(), l.te_weight, l.unet_weight))
            .collect();
        settings.push(format!("LoRAs {}", l.join(", ")));
    }
    if !job.plugins.is_empty() {
        let p: Vec<&str> = job
            .plugins
            .iter()
            .map(|p| p.lib.manifest.name.as_str())
            .collect();
        settings.push(format!("plugins {}", p.join(", ")));
    }
    Error::Message(format!(
        "{at} hold NaN or infinity; no weight file of the model, VAE or ControlNets holds \
         any, so the settings ({}) drove the numbers out of range; nothing written",
        settings.join(", ")
    ))
}
