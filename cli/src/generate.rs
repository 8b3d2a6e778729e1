//! `sdctl generate`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sd_controlnet::{ControlNetHook, UnitSpec};
use sd_pipeline::generation::image_io::{image_size, load_image, load_mask, write_png};
use sd_pipeline::rng::PhiloxRng;
use sd_pipeline::rng::TorchRng;
use sd_pipeline::{GenerateRequest, StableDiffusion};
use sd_plugins_api::HookSet;

use crate::progress::Progress;
use crate::CliResult;

pub use crate::settings::SettingsArgs as GenerateArgs;

/// Output file names: OUT.png, or OUT-0.png... for batches.
pub fn output_paths(out: &Path, batch: usize) -> Vec<PathBuf> {
    if batch == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_string())
        .unwrap_or_else(|| "png".into());
    (0..batch)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

fn load_noise(path: &Path) -> CliResult<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| format!("--noise {}: {e}", path.display()))?;
    let t = tensors.get("noise").ok_or_else(|| {
        let names: Vec<&String> = tensors.keys().collect();
        format!(
            "--noise {}: no tensor named `noise` (found {names:?})",
            path.display()
        )
    })?;
    Ok(t.to_dtype(DType::F32)?)
}

pub fn run(args: GenerateArgs) -> CliResult {
    let t0 = Instant::now();
    let st = crate::settings::load(&args)?;
    st.require_for_generate()?;
    let model = match st.model.clone() {
        Some(m) => m,
        None => crate::embedded::base_dir()?,
    };
    let output = st.output.clone().unwrap_or_default();
    let (sampler, schedule) = (st.sampler, st.schedule);
    let device = crate::device::device(&st.device)?;
    let dtype = crate::device::dtype(&st.dtype)?;
    crate::device::check_dtype(&device, dtype)?;
    let noise = st.noise.as_deref().map(load_noise).transpose()?;
    let specs: Vec<UnitSpec> = st.control.iter().map(|c| c.spec.clone()).collect();

    // LoRAs: [[lora]] tables and --lora flags, then <lora:NAME:...> tags, which are removed
    // from the prompt.
    let (prompt, tags) =
        sd_lora::extract_lora_tags(&st.prompt).map_err(|e| format!("prompt: {e}"))?;
    let mut lora_specs: Vec<sd_lora::LoraSpec> = st.lora.iter().map(|l| l.spec.clone()).collect();
    for t in &tags {
        let path = sd_lora::resolve_in(st.lora_dir.as_deref(), &t.name);
        if !path.is_file() {
            return Err(format!(
                "<lora:{}>: no file {} (set --lora-dir to the folder holding NAME.safetensors)",
                t.name,
                path.display()
            )
            .into());
        }
        lora_specs.push(sd_lora::LoraSpec {
            path,
            unet_weight: t.unet_weight,
            te_weight: t.te_weight,
        });
    }
    let mut patches: Vec<std::sync::Arc<dyn sd_plugins_api::WeightPatch>> = Vec::new();
    if !lora_specs.is_empty() {
        let targets = sd_lora::Targets::from_model(&model)?;
        for spec in &lora_specs {
            let (patch, report) = sd_lora::load_lora(spec, &targets)?;
            eprintln!("lora {}", report.summary());
            if st.strict_lora && !report.unmatched.is_empty() {
                return Err(format!("--strict-lora: {}", report.summary()).into());
            }
            patches.push(std::sync::Arc::new(patch));
        }
    }
    // hook plugins: one instance each for this generation (its weight patch applies while
    // the model loads, its hook points while it generates)
    let instances = st
        .plugins
        .iter()
        .map(|p| p.lib.instance(&p.params))
        .collect::<Result<Vec<_>, _>>()?;
    patches.extend(instances.iter().map(|i| i.patch()));
    let sd = StableDiffusion::load_with_vae(&model, &device, dtype, &patches, st.vae.as_deref())?;
    let t_loaded = t0.elapsed();
    let (width, height) = match (&st.init_image, st.width, st.height) {
        (_, Some(w), Some(h)) => (w, h),
        (Some(img), w, h) => {
            let (iw, ih) = image_size(img)?;
            (w.unwrap_or(iw), h.unwrap_or(ih))
        }
        // the size the model was trained at (diffusers' default)
        (None, w, h) => {
            let (dw, dh) = sd.default_size();
            (w.unwrap_or(dw), h.unwrap_or(dh))
        }
    };
    let f = sd.vae_scale_factor();
    for (name, v) in [("--width", width), ("--height", height)] {
        if v == 0 || v % f != 0 {
            return Err(format!("{name} {v} is not a positive multiple of {f}").into());
        }
    }
    let init_image = st
        .init_image
        .as_deref()
        .map(|p| load_image(p, width, height, &device))
        .transpose()?;
    let mask = st
        .mask
        .as_deref()
        .map(|p| load_mask(p, width, height, &device))
        .transpose()?;
    let seed = st.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 & 0xffff_ffff)
            .unwrap_or(0)
    });
    let req = GenerateRequest {
        prompt,
        negative_prompt: st.negative_prompt.clone(),
        width,
        height,
        steps: st.steps,
        cfg_scale: st.cfg_scale,
        sampler,
        schedule,
        batch: st.batch,
        clip_skip: st.clip_skip,
        init_image,
        mask,
        strength: st.strength,
        noise,
    };
    sd.validate(&req)?;
    // Every ControlNet, control image and mask is loaded and checked before denoising starts.
    let t_units = Instant::now();
    let mut cache = Vec::new();
    let registry = &st.registry;
    let units = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.build(&sd, width, height, &mut cache, registry)
                .map_err(|e| format!("control[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let units_took = t_units.elapsed();

    let progress = Progress::new();
    let bar = progress.bar();
    let mut hooks = HookSet::new();
    if !units.is_empty() {
        hooks.push(Box::new(ControlNetHook::new(units)));
    }
    for i in &instances {
        hooks.push(i.hook());
    }
    hooks.push(Box::new(progress));
    let mut rng: Box<dyn sd_pipeline::rng::NoiseSource> = match st.rng.as_str() {
        "philox" => Box::new(PhiloxRng::new(seed)),
        _ => Box::new(TorchRng::new(seed)),
    };
    let latents = sd.denoise(&req, &mut hooks, rng.as_mut())?;
    bar.finish_and_clear();
    let sampling = bar.elapsed();
    let steps_run = bar.position();

    let t_dec = Instant::now();
    let mut images = sd.decode_latents(&latents)?;
    hooks.on_image(&mut images)?;
    let decode = t_dec.elapsed();

    let t_write = Instant::now();
    let run = crate::infotext::Run {
        st: &st,
        req: &req,
        seed: st.noise.is_none().then_some(seed),
        model: &model,
        loras: &lora_specs,
    };
    let mut hashes = crate::hashes::HashCache::open();
    let parameters = run.parameters(&mut hashes);
    let json = run.settings_json(&mut hashes).to_string();
    hashes.save();
    let text = [
        ("parameters", parameters.as_str()),
        (crate::infotext::JSON_CHUNK, json.as_str()),
    ];
    let paths = output_paths(&output, req.batch);
    // All-or-nothing output: everything is written under temporary names first, then renamed.
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let written = (|| -> CliResult {
        if let Some(p) = &st.save_latents {
            let tmp = p.with_extension("safetensors.tmp");
            staged.push((tmp.clone(), p.clone()));
            candle_core::safetensors::save(
                &[("latents", latents.to_dtype(DType::F32)?)]
                    .into_iter()
                    .collect(),
                &tmp,
            )
            .map_err(|e| format!("--save-latents {}: {e}", p.display()))?;
        }
        for (i, p) in paths.iter().enumerate() {
            let tmp = p.with_extension("png.tmp");
            staged.push((tmp.clone(), p.clone()));
            write_png(&tmp, &images.get(i)?, &text)?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        for (tmp, _) in &staged {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }
    for (tmp, p) in &staged {
        std::fs::rename(tmp, p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let its = steps_run as f64 / sampling.as_secs_f64().max(1e-9);
    let controls = if specs.is_empty() {
        String::new()
    } else {
        format!(", controls {:.1} s", units_took.as_secs_f64())
    };
    eprintln!(
        "{} image{} {}x{} in {:.1} s: load {:.1} s{controls}, {} steps in {:.1} s ({:.2} it/s; text encoding included), decode {:.1} s, write {:.1} s; seed {} -> {}",
        req.batch,
        if req.batch == 1 { "" } else { "s" },
        width,
        height,
        t0.elapsed().as_secs_f64(),
        t_loaded.as_secs_f64(),
        steps_run,
        sampling.as_secs_f64(),
        its,
        decode.as_secs_f64(),
        t_write.elapsed().as_secs_f64(),
        if st.noise.is_some() { "(noise file)".to_string() } else { seed.to_string() },
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
