//! What a model file or folder is (`sdctl model inspect`), and conversions between a
//! single-file checkpoint and a diffusers folder (`sdctl model convert`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use sd_pipeline::loading::single_file::{self, Checkpoint, Kind};
use sd_pipeline::output::StagedDir;
use sd_plugins_api::ModelPart;
use sd_weights::Store;

use crate::error::Result;

/// A description of a diffusers folder or a weight file, one fact a line: format, family,
/// prediction, inpainting, parameters per part, dtypes, and for single files what was
/// ignored or not understood.
pub fn describe(path: &Path) -> Result<String> {
    let mut out = String::new();
    sd_plugins_api::input_file::check_file_or_folder(path)?;
    if path.is_dir() {
        describe_folder(path, &mut out)?;
    } else if path.is_file() {
        describe_file(path, &mut out)?;
    } else {
        return Err(format!("{}: no such file or folder", path.display()).into());
    }
    Ok(out)
}

/// What `convert` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Diffusers,
    SingleFile,
}

/// Convert `input` (a single file or a diffusers folder) to `target` at `output`; `half`
/// writes float16. A diffusers folder to a diffusers folder is a float16 copy.
pub fn convert(input: &Path, output: &Path, target: Target, half: bool) -> Result<()> {
    sd_plugins_api::input_file::check_file_or_folder(input)?;
    match target {
        Target::Diffusers => {
            if input.is_dir() {
                if !half {
                    return Err(format!(
                        "{}: already a diffusers folder (add --half to write a float16 copy)",
                        input.display()
                    )
                    .into());
                }
                if output.exists() {
                    return Err(format!("--output {}: already exists", output.display()).into());
                }
                let stage = StagedDir::new(output)?;
                half_copy(input, stage.path())?;
                stage.commit()?;
                return Ok(());
            }
            single_file::convert::to_diffusers(input, output, half)?;
        }
        Target::SingleFile => {
            if !input.join("model_index.json").is_file() {
                return Err(format!(
                    "{}: not a diffusers folder (model_index.json not found)",
                    input.display()
                )
                .into());
            }
            if output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                return Err(
                    format!("--output {}: name it NAME.safetensors", output.display()).into(),
                );
            }
            single_file::convert::to_single_file(input, output, half)?;
        }
    }
    Ok(())
}

fn millions(n: usize) -> String {
    format!("{:.2} M", n as f64 / 1e6)
}

fn dtypes(list: &[(String, candle_core::DType)]) -> String {
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for (_, d) in list {
        *count.entry(format!("{d:?}").to_lowercase()).or_default() += 1;
    }
    count
        .iter()
        .map(|(d, n)| format!("{d} ({n} tensors)"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_folder(path: &Path, out: &mut String) -> Result<()> {
    let read = |p: &str| -> Result<serde_json::Value> {
        let f = path.join(p);
        let t = sd_plugins_api::input_file::read_to_string(&f)?;
        Ok(serde_json::from_str(&t).map_err(|e| format!("{}: {e}", f.display()))?)
    };
    let unet = read("unet/config.json")?;
    let sched = read("scheduler/scheduler_config.json")?;
    let _ = writeln!(out, "path: {}", path.display());
    let _ = writeln!(out, "format: diffusers folder");
    let has = |d: &str| path.join(d).is_dir();
    let family = if unet["addition_embed_type"].as_str() == Some("text_time") {
        if has("text_encoder") {
            "SDXL (CLIP-L text_encoder, OpenCLIP bigG text_encoder_2)"
        } else {
            "SDXL refiner (OpenCLIP bigG text_encoder_2)"
        }
    } else if read("text_encoder/config.json")?["hidden_act"].as_str() == Some("gelu") {
        "SD 2.x (OpenCLIP text encoder)"
    } else {
        "SD 1.x (CLIP text encoder)"
    };
    let _ = writeln!(out, "family: {family}");
    let _ = writeln!(
        out,
        "prediction: {}",
        sched["prediction_type"].as_str().unwrap_or("epsilon")
    );
    let inc = unet["in_channels"].as_u64().unwrap_or(4);
    let _ = writeln!(
        out,
        "inpainting: {}",
        if inc == 9 {
            "yes (9-channel UNet)"
        } else {
            "no"
        }
    );
    let mut all = Vec::new();
    for part in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        if !has(part) {
            continue;
        }
        let mut n = 0;
        for f in sd_pipeline::loading::files::weight_files(&path.join(part))? {
            let store = Store::open(&f)?;
            n += store
                .shapes()
                .values()
                .map(|s| s.iter().product::<usize>())
                .sum::<usize>();
            all.extend(store.dtypes());
        }
        let _ = writeln!(out, "parameters {part}: {}", millions(n));
    }
    let _ = writeln!(out, "dtype: {}", dtypes(&all));
    Ok(())
}

fn describe_file(path: &Path, out: &mut String) -> Result<()> {
    let store = Store::open(path)?;
    let shapes = store.shapes();
    let format = if sd_weights::pickle::is_pickle(path) {
        "PyTorch pickle (read without running code)"
    } else {
        "safetensors"
    };
    let _ = writeln!(out, "path: {}", path.display());
    let _ = writeln!(out, "format: {format}, {} tensors", shapes.len());
    let _ = writeln!(out, "dtype: {}", dtypes(&store.dtypes()));
    let total: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
    match single_file::detect::kind(&shapes) {
        Kind::Checkpoint => {}
        k => {
            let what = match k {
                Kind::ControlNet => "ControlNet (use it in a control unit)",
                Kind::Lora => "LoRA (use it with --lora)",
                Kind::Vae => "VAE (use it with --vae)",
                _ => "unknown (no Stable Diffusion keys)",
            };
            let _ = writeln!(out, "kind: {what}");
            let _ = writeln!(out, "parameters: {}", millions(total));
            return Ok(());
        }
    }
    drop(store);
    let ck = Checkpoint::open(path)?;
    let d = &ck.detected;
    let _ = writeln!(out, "kind: single-file checkpoint (LDM layout)");
    let _ = writeln!(
        out,
        "family: {} ({})",
        d.family.name(),
        match d.family {
            single_file::Family::Sd1 => "CLIP text encoder: cond_stage_model.transformer.*",
            single_file::Family::Sd2 => "OpenCLIP text encoder: cond_stage_model.model.*",
            single_file::Family::Sdxl =>
                "CLIP-L conditioner.embedders.0.transformer.*, OpenCLIP bigG conditioner.embedders.1.model.*",
            single_file::Family::SdxlRefiner => "OpenCLIP bigG conditioner.embedders.0.model.*",
        }
    );
    let _ = writeln!(
        out,
        "prediction: {}",
        if d.v_prediction {
            "v_prediction"
        } else {
            "epsilon"
        }
    );
    let _ = writeln!(
        out,
        "inpainting: {}",
        if d.inpaint {
            "yes (9-channel UNet: model.diffusion_model.input_blocks.0.0.weight)"
        } else {
            "no"
        }
    );
    let _ = writeln!(
        out,
        "config: {}",
        match &ck.sidecar {
            Some(y) => format!("sidecar {}", y.display()),
            None => "detected from the tensors (no sidecar yaml)".into(),
        }
    );
    let inv = ck.inventory()?;
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for (part, _, _, shape) in &inv.params {
        let name = match part {
            ModelPart::Unet => "unet",
            ModelPart::Vae => "vae",
            ModelPart::TextEncoder => "text_encoder",
            ModelPart::TextEncoder2 => "text_encoder_2",
        };
        *per.entry(name).or_default() += shape.iter().product::<usize>();
    }
    for (k, n) in &per {
        let _ = writeln!(out, "parameters {k}: {}", millions(*n));
    }
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for k in &inv.ignored {
        let g = if k.starts_with("model_ema.") {
            "model_ema.*".to_string()
        } else if k.contains(".resblocks.") {
            "OpenCLIP's last resblock (unused: SD2 stops at the penultimate)".into()
        } else {
            k.clone()
        };
        *groups.entry(g).or_default() += 1;
    }
    let _ = writeln!(out, "ignored: {} tensors", inv.ignored.len());
    for (g, n) in groups {
        let _ = writeln!(out, "  {g}: {n}");
    }
    let _ = writeln!(out, "not understood: {} keys", inv.unknown.len());
    for k in inv.unknown.iter().take(20) {
        let _ = writeln!(out, "  {k}");
    }
    if inv.unknown.len() > 20 {
        let _ = writeln!(out, "  ... and {} more", inv.unknown.len() - 20);
    }
    Ok(())
}

/// Copy a folder tree, writing every `.safetensors` file's float tensors as float16.
fn half_copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for e in std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let e = e.map_err(|e| format!("{}: {e}", from.display()))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.path().is_dir() {
            half_copy(&src, &dst)?;
        } else if src.extension().is_some_and(|x| x == "safetensors") {
            let m = candle_core::safetensors::load(&src, &candle_core::Device::Cpu)
                .map_err(|e| format!("{}: {e}", src.display()))?;
            let m: std::collections::HashMap<String, candle_core::Tensor> = m
                .into_iter()
                .map(|(k, t)| {
                    let t = if t.dtype().is_float() {
                        t.to_dtype(candle_core::DType::F16)?
                    } else {
                        t
                    };
                    Ok((k, t))
                })
                .collect::<candle_core::Result<_>>()?;
            candle_core::safetensors::save(&m, &dst)
                .map_err(|e| format!("{}: {e}", dst.display()))?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| format!("{}: {e}", dst.display()))?;
        }
    }
    Ok(())
}
