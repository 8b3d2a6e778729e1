//! `sdctl generate`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Args;
use sd_controlnet::{ControlNetHook, UnitSpec};
use sd_pipeline::image_io::{image_size, load_image, load_mask, write_png};
use sd_pipeline::noise::TorchRng;
use sd_pipeline::samplers::{SamplerKind, Schedule};
use sd_pipeline::{GenerateRequest, StableDiffusion};
use sd_plugins_api::HookSet;

use crate::progress::Progress;
use crate::CliResult;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// diffusers-layout model folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Image width (multiple of 8); default 512, or the init image's width
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height (multiple of 8); default 512, or the init image's height
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub cfg_scale: f64,
    /// ddim | euler | euler_a | dpmpp_2m (A1111, ComfyUI and diffusers names work too:
    /// "DPM++ 2M Karras", "Euler a", euler_ancestral, DPMSolverMultistepScheduler)
    #[arg(long, default_value = "dpmpp_2m")]
    pub sampler: String,
    /// normal | karras (default karras, or what the sampler name says)
    #[arg(long)]
    pub schedule: Option<String>,
    /// Seed of the noise (the same noise as torch.Generator("cpu").manual_seed); random if absent
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images generated at once
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// CLIP layers to skip, A1111 numbering: 1 = last layer, 2 = penultimate
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Source image for img2img, or for inpainting with --mask
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Denoising strength in (0, 1]; default 0.8 for img2img, 1.0 for inpainting
    #[arg(long)]
    pub strength: Option<f64>,
    /// Inpainting mask (white = repaint)
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// safetensors file with one f32 tensor `noise` [batch, 4, H/8, W/8] replacing the initial noise
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Write the final latents (before VAE decoding) as tensor `latents` to this safetensors file
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Output PNG; with --batch N > 1, OUT-0.png, OUT-1.png, ...
    #[arg(long)]
    pub output: PathBuf,
    /// cpu | cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32 | f16 | bf16 (model weights and activations)
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A control unit, repeatable: model=PATH,image=PATH[,weight=F][,start=F][,end=F]
    /// [,mode=balanced|prompt|control][,resize=just|crop|fill][,preprocessor=NAME][,mask=PATH]
    #[arg(long = "control", value_name = "KEY=VALUE,...")]
    pub control: Vec<String>,
    /// A LoRA, repeatable: PATH[:WEIGHT] (weight for UNet and text encoder, default 1)
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    pub lora: Vec<String>,
    /// Where `<lora:NAME:WEIGHT>` prompt tags find NAME.safetensors
    #[arg(long)]
    pub lora_dir: Option<PathBuf>,
    /// Fail when a LoRA has keys that match nothing in the model (otherwise they are reported)
    #[arg(long)]
    pub strict_lora: bool,
}

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

fn infotext(args: &GenerateArgs, req: &GenerateRequest, seed: Option<u64>, model: &Path) -> String {
    let mut s = args.prompt.clone();
    if !req.negative_prompt.is_empty() {
        s.push_str(&format!("\nNegative prompt: {}", req.negative_prompt));
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, Schedule type: {}, CFG scale: {}, ",
        req.steps, req.sampler, req.schedule, req.cfg_scale
    ));
    match seed {
        Some(seed) => s.push_str(&format!("Seed: {seed}, ")),
        None => s.push_str("Seed: noise file, "),
    }
    s.push_str(&format!(
        "Size: {}x{}, Model: {}",
        req.width,
        req.height,
        model.file_name().unwrap_or_default().to_string_lossy()
    ));
    if req.clip_skip > 1 {
        s.push_str(&format!(", Clip skip: {}", req.clip_skip));
    }
    if args.init_image.is_some() {
        s.push_str(&format!(
            ", Denoising strength: {}",
            req.effective_strength()
        ));
    }
    s
}

pub fn run(args: GenerateArgs) -> CliResult {
    let t0 = Instant::now();
    let (sampler, implied) =
        SamplerKind::parse_alias(&args.sampler).map_err(|e| format!("--sampler: {e}"))?;
    let schedule: Schedule = match (&args.schedule, implied) {
        (Some(s), _) => s.parse().map_err(|e| format!("--schedule: {e}"))?,
        (None, Some(s)) => s,
        (None, None) => Schedule::Karras,
    };
    let device = crate::device::device(&args.device)?;
    let dtype = crate::device::dtype(&args.dtype)?;
    crate::device::check_dtype(&device, dtype)?;
    if args.strength.is_some() && args.init_image.is_none() {
        return Err("--strength needs --init-image".into());
    }
    if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(format!(
                "--output {}: folder {} does not exist",
                args.output.display(),
                parent.display()
            )
            .into());
        }
    }
    let (width, height) = match (&args.init_image, args.width, args.height) {
        (_, Some(w), Some(h)) => (w, h),
        (Some(img), w, h) => {
            let (iw, ih) = image_size(img)?;
            (w.unwrap_or(iw), h.unwrap_or(ih))
        }
        (None, w, h) => (w.unwrap_or(512), h.unwrap_or(512)),
    };
    let noise = args.noise.as_deref().map(load_noise).transpose()?;
    let specs = args
        .control
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.parse::<UnitSpec>()
                .map_err(|e| format!("--control #{}: {e}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;

    // LoRAs: --lora flags, then <lora:NAME:...> tags, which are removed from the prompt.
    let (prompt, tags) =
        sd_lora::extract_lora_tags(&args.prompt).map_err(|e| format!("--prompt: {e}"))?;
    let mut lora_specs = args
        .lora
        .iter()
        .map(|l| sd_lora::LoraSpec::parse(l).map_err(|e| format!("--lora: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    for t in &tags {
        let path = sd_lora::resolve_in(args.lora_dir.as_deref(), &t.name);
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
        if !args.model.join("model_index.json").is_file() {
            return Err(format!(
                "--model {}: not a diffusers model folder (model_index.json not found)",
                args.model.display()
            )
            .into());
        }
        let targets = sd_lora::Targets::from_model(&args.model)?;
        for spec in &lora_specs {
            let (patch, report) = sd_lora::load_lora(spec, &targets)?;
            eprintln!("lora {}", report.summary());
            if args.strict_lora && !report.unmatched.is_empty() {
                return Err(format!("--strict-lora: {}", report.summary()).into());
            }
            patches.push(std::sync::Arc::new(patch));
        }
    }
    let sd = StableDiffusion::load(&args.model, &device, dtype, &patches)?;
    let t_loaded = t0.elapsed();
    let f = sd.vae_scale_factor();
    for (name, v) in [("--width", width), ("--height", height)] {
        if v == 0 || v % f != 0 {
            return Err(format!("{name} {v} is not a positive multiple of {f}").into());
        }
    }
    let init_image = args
        .init_image
        .as_deref()
        .map(|p| load_image(p, width, height, &device))
        .transpose()?;
    let mask = args
        .mask
        .as_deref()
        .map(|p| load_mask(p, width, height, &device))
        .transpose()?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 & 0xffff_ffff)
            .unwrap_or(0)
    });
    let req = GenerateRequest {
        prompt,
        negative_prompt: args.negative_prompt.clone(),
        width,
        height,
        steps: args.steps,
        cfg_scale: args.cfg_scale,
        sampler,
        schedule,
        batch: args.batch,
        clip_skip: args.clip_skip,
        init_image,
        mask,
        strength: args.strength,
        noise,
    };
    sd.validate(&req)?;
    // Every ControlNet, control image and mask is loaded and checked before denoising starts.
    let mut cache = Vec::new();
    let units = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.build(&sd, width, height, &mut cache)
                .map_err(|e| format!("--control #{}: {e}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let progress = Progress::new();
    let bar = progress.bar();
    let mut hooks = HookSet::new();
    if !units.is_empty() {
        hooks.push(Box::new(ControlNetHook::new(units)));
    }
    hooks.push(Box::new(progress));
    let mut rng = TorchRng::new(seed);
    let latents = sd.denoise(&req, &mut hooks, &mut rng)?;
    bar.finish_and_clear();
    let sampling = bar.elapsed();
    let steps_run = bar.position();

    let t_dec = Instant::now();
    let mut images = sd.decode_latents(&latents)?;
    hooks.on_image(&mut images)?;
    let decode = t_dec.elapsed();

    let info = infotext(
        &args,
        &req,
        args.noise.is_none().then_some(seed),
        &args.model,
    );
    let paths = output_paths(&args.output, req.batch);
    // All-or-nothing output: everything is written under temporary names first, then renamed.
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let written = (|| -> CliResult {
        if let Some(p) = &args.save_latents {
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
            write_png(&tmp, &images.get(i)?, Some(&info))?;
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
    eprintln!(
        "{} image{} {}x{} in {:.1} s: load {:.1} s, {} steps in {:.1} s ({:.2} it/s), decode {:.1} s; seed {} -> {}",
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
        if args.noise.is_some() { "(noise file)".to_string() } else { seed.to_string() },
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
