//! `sdctl lora merge`: a patched model written in diffusers layout.

use std::path::Path;

use candle_core::{DType, Device};
use sd_pipeline::loading::files::weight_files;
use sd_pipeline::output::StagedDir;
use sd_plugins_api::{ModelPart, WeightPatch};

use crate::error::{LoraError, Result};
use crate::patch::LoraPatch;

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), dst)?;
        }
    }
    Ok(())
}

/// Write `model` with `patches` merged into `out` (a new folder). UNet and text-encoder
/// weights are written as f32 `diffusion_pytorch_model.safetensors` / `model.safetensors`;
/// everything else is copied. Nothing is left behind on error.
pub fn merge_into(model: &Path, patches: &[LoraPatch], out: &Path) -> Result<()> {
    if out.exists() {
        return Err(LoraError::file(
            out,
            "output already exists; choose a new folder",
        ));
    }
    let stage = StagedDir::new(out)?;
    let tmp = stage.path();
    copy_dir(model, tmp).map_err(|e| LoraError::file(model, e.to_string()))?;
    for (dir, part, file) in [
        (
            "unet",
            ModelPart::Unet,
            "diffusion_pytorch_model.safetensors",
        ),
        ("text_encoder", ModelPart::TextEncoder, "model.safetensors"),
        (
            "text_encoder_2",
            ModelPart::TextEncoder2,
            "model.safetensors",
        ),
    ] {
        if part == ModelPart::TextEncoder2 && !model.join(dir).is_dir() {
            continue; // SDXL only
        }
        let files = weight_files(&model.join(dir))?;
        let mut tensors = std::collections::HashMap::new();
        for f in &files {
            for (name, t) in candle_core::safetensors::load(f, &Device::Cpu)? {
                let mut t = t.to_dtype(DType::F32)?;
                if let Some(found) = sd_weights::finite::first_non_finite(&t)? {
                    return Err(LoraError::file(
                        f,
                        format!(
                            "tensor {name} holds {}; nothing merged",
                            sd_weights::finite::describe(found)
                        ),
                    ));
                }
                let mut applied = Vec::new();
                for p in patches {
                    if let Some(d) = p
                        .delta(part, &name, &t)
                        .map_err(|e| LoraError::Invalid(e.to_string()))?
                    {
                        t = (t + d)?;
                        let w = match part {
                            ModelPart::TextEncoder | ModelPart::TextEncoder2 => p.te_weight,
                            _ => p.unet_weight,
                        };
                        applied.push(format!("LoRA {} (weight {w})", p.name()));
                    }
                }
                // the LoRAs' values are finite (checked when loaded); their sum with the
                // model's weights can still overflow
                if !applied.is_empty() && !sd_weights::finite::all_finite(&t)? {
                    let found = sd_weights::finite::first_non_finite(&t)?.unwrap_or((0, f64::NAN));
                    return Err(LoraError::Invalid(format!(
                        "merging {} into {name} of {} gives {}: the result would not be a \
                         finite number; nothing written",
                        applied.join(" and "),
                        f.display(),
                        sd_weights::finite::describe(found)
                    )));
                }
                tensors.insert(name, t);
            }
        }
        for e in
            std::fs::read_dir(tmp.join(dir)).map_err(|e| LoraError::file(tmp, e.to_string()))?
        {
            let p = e.map_err(|e| LoraError::file(tmp, e.to_string()))?.path();
            if p.to_string_lossy().contains(".safetensors") {
                std::fs::remove_file(&p).map_err(|e| LoraError::file(&p, e.to_string()))?;
            }
        }
        candle_core::safetensors::save(&tensors, tmp.join(dir).join(file))?;
    }
    stage.commit()?;
    Ok(())
}
