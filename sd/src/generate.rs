//! Running a [`Job`]: LoRAs (flags, tables and prompt tags) and plugin weight patches applied
//! while the model loads, control units built and checked before denoising, the denoising loop
//! with the hooks, decoding, and the infotext the PNGs carry.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use sd_controlnet::ControlNetHook;
use sd_lora::LoraSpec;
use sd_pipeline::generation::image_io::{
    image_size, image_tensor, load_image, load_mask, mask_tensor, open as open_image, to_rgb8,
    write_png,
};
use sd_pipeline::rng::PhiloxRng;
use sd_pipeline::rng::{NoiseSource, TorchRng};
use sd_pipeline::{GenerateRequest, StableDiffusion};
use sd_plugins_api::dylib::host::PluginInstance;
use sd_plugins_api::{Hook, HookSet, Registry, WeightPatch};

use crate::error::Result;
use crate::hashes::HashCache;
use crate::infotext::{Run, JSON_CHUNK};
use crate::job::{Job, Rng};
use crate::output::output_paths;
use sd_pipeline::output::Staged;

/// What a generation made.
pub struct Generation {
    /// The decoded images, `[batch, 3, height, width]` in `[0, 1]`.
    pub images: Tensor,
    /// The final latents (what `--save-latents` writes).
    pub latents: Tensor,
    /// The seed used; `None` when the noise came from a file.
    pub seed: Option<u64>,
    pub width: usize,
    pub height: usize,
    /// Every LoRA applied: the job's list, then the prompt's tags.
    pub loras: Vec<LoraSpec>,
    /// What binding each LoRA to the model found, in `loras` order.
    pub lora_reports: Vec<String>,
    /// A1111's infotext (the PNG's `parameters` chunk).
    pub parameters: String,
    /// Every setting as JSON (the PNG's `sdctl` chunk, what `--from-png` reads back).
    pub settings_json: String,
    pub timings: Timings,
}

/// Where the time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Loading the model (and patching it).
    pub load: Duration,
    /// Loading ControlNets, control images and masks (and running preprocessors).
    pub controls: Duration,
    /// Text encoding and denoising.
    pub sampling: Duration,
    pub decode: Duration,
}

impl Generation {
    /// The PNG text chunks: A1111's `parameters` and sdctl's JSON settings.
    pub fn png_text(&self) -> [(&str, &str); 2] {
        [
            ("parameters", self.parameters.as_str()),
            (JSON_CHUNK, self.settings_json.as_str()),
        ]
    }

    /// Write the images (OUT.png, or OUT-0.png... for batches) and, if asked, the latents,
    /// all or nothing. Returns the image paths.
    pub fn write(&self, output: &Path, save_latents: Option<&Path>) -> Result<Vec<PathBuf>> {
        let paths = output_paths(output, self.images.dim(0)?);
        let mut staged = Staged::new();
        if let Some(p) = save_latents {
            staged.write(p, |tmp| -> Result<()> {
                candle_core::safetensors::save(
                    &[("latents", self.latents.to_dtype(DType::F32)?)]
                        .into_iter()
                        .collect(),
                    tmp,
                )
                .map_err(|e| format!("--save-latents {}: {e}", p.display()).into())
            })?;
        }
        let text = self.png_text();
        for (i, p) in paths.iter().enumerate() {
            staged.write(p, |tmp| -> Result<()> {
                Ok(write_png(tmp, &self.images.get(i)?, &text)?)
            })?;
        }
        staged.commit()?;
        Ok(paths)
    }
}

/// `--device` and `--dtype` as candle's (the dtype models load in: see
/// [`crate::device::compute_dtype`]).
pub fn device_and_dtype(job: &Job) -> Result<(Device, DType)> {
    let device = crate::device::device(&job.device)?;
    let dtype = crate::device::dtype(&job.dtype)?;
    let dtype = crate::device::compute_dtype(&device, dtype)?;
    Ok((device, dtype))
}

/// The job's prompts are no longer than [`crate::schema::MAX_PROMPT_BYTES`].
fn check_prompt_lengths(job: &Job) -> Result<()> {
    for (key, text) in [
        ("prompt", job.prompt.as_str()),
        (
            "negative_prompt",
            job.negative_prompt.as_deref().unwrap_or(""),
        ),
    ] {
        if let Some(problem) = crate::schema::prompt_too_long(key, text.len()) {
            return Err(problem.into());
        }
    }
    Ok(())
}

fn load_noise(path: &Path) -> Result<Tensor> {
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

/// The job's LoRAs, then those its prompt's `<lora:NAME:...>` tags name (looked up in
/// `lora_dir`), and the prompt without the tags.
pub fn resolve_loras(job: &Job) -> Result<(String, Vec<LoraSpec>)> {
    let (prompt, tags) =
        sd_lora::extract_lora_tags(&job.prompt).map_err(|e| format!("prompt: {e}"))?;
    let mut specs = job.lora.clone();
    for t in &tags {
        // a tag names a file inside lora_dir, never a path (the prompt may come from anyone)
        t.check_weights(job.allow_extreme_weights)?;
        let path = sd_lora::resolve_tag(job.lora_dir.as_deref(), &t.name)?;
        specs.push(LoraSpec {
            path,
            unet_weight: t.unet_weight,
            te_weight: t.te_weight,
        });
    }
    Ok((prompt, specs))
}

/// The model a job names (a folder, a single file, or a Hugging Face repo id found in the
/// local cache), or the embedded one.
pub fn model_path(job: &Job) -> Result<PathBuf> {
    match &job.model {
        Some(m) if !m.exists() && m.to_str().is_some_and(crate::hub::looks_like_repo_id) => {
            Ok(crate::hub::resolve(&m.to_string_lossy())?)
        }
        Some(m) => Ok(m.clone()),
        None => crate::embedded::base_dir(),
    }
}

/// A model loaded for a job: LoRAs and plugin weight patches merged in.
pub struct Loaded {
    pub sd: StableDiffusion,
    pub model: PathBuf,
    /// The prompt without its LoRA tags.
    pub prompt: String,
    pub loras: Vec<LoraSpec>,
    /// What binding each LoRA to the model found (`LoraReport::summary`), in `loras` order.
    pub lora_reports: Vec<String>,
    /// One instance of each hook plugin for this generation.
    plugins: Vec<PluginInstance>,
    pub device: Device,
    /// The SDXL refiner, when the job names one (no LoRAs or patches: those are the base's).
    pub refiner: Option<StableDiffusion>,
    /// What `embeddings_dir` held that the model cannot use: `(file or name, why)`.
    pub embeddings_skipped: Vec<(String, String)>,
    /// A TAESD given as `vae`: the final decode (the model's own VAE still encodes).
    pub tiny_vae: Option<sd_pipeline::model::taesd::AutoencoderTiny>,
    /// What the live previews are decoded with.
    pub preview: sd_pipeline::generation::preview::PreviewDecoder,
}

/// Load the job's model with its LoRAs and plugin patches.
pub fn load(job: &Job) -> Result<Loaded> {
    check_prompt_lengths(job)?;
    job.check_inputs()?;
    let model = model_path(job)?;
    let (device, dtype) = device_and_dtype(job)?;
    let (prompt, loras) = resolve_loras(job)?;
    // the LoRAs the prompt's tags name (those of `job.lora` are checked above)
    for l in &loras[job.lora.len()..] {
        sd_plugins_api::input_file::check(&l.path).map_err(|e| format!("prompt LoRA tag {e}"))?;
    }
    let mut patches: Vec<Arc<dyn WeightPatch>> = Vec::new();
    let mut lora_reports = Vec::new();
    if !loras.is_empty() {
        let targets = sd_lora::Targets::from_model(&model)?;
        for spec in &loras {
            let (patch, report) = sd_lora::load_lora(spec, &targets)?;
            lora_reports.push(report.summary());
            if job.strict_lora && !report.unmatched.is_empty() {
                return Err(format!("--strict-lora: {}", report.summary()).into());
            }
            patches.push(Arc::new(patch));
        }
    }
    // hook plugins: one instance each for this generation (its weight patch applies while
    // the model loads, its hook points while it generates)
    let plugins = job
        .plugins
        .iter()
        .map(|p| p.lib.instance(&p.params))
        .collect::<Result<Vec<_>, _>>()?;
    patches.extend(plugins.iter().map(|i| i.patch()));
    // a TAESD as `vae` decodes; the model keeps its own VAE for encoding
    let tiny_vae = match job.vae.as_deref() {
        Some(v) if sd_pipeline::model::taesd::looks_like_taesd(v) => Some(
            sd_pipeline::model::taesd::AutoencoderTiny::load(v, &device, dtype)
                .map_err(|e| format!("vae {e}"))?,
        ),
        Some(v) if v.is_dir() => {
            return Err(format!(
                "vae {}: a folder must be a TAESD (AutoencoderTiny); give a VAE as its file",
                v.display()
            )
            .into())
        }
        _ => None,
    };
    let vae = job.vae.as_deref().filter(|_| tiny_vae.is_none());
    let offload = if job.lowvram {
        sd_pipeline::Offload::Cpu
    } else {
        sd_pipeline::Offload::None
    };
    let mut sd = StableDiffusion::load_placed(&model, &device, dtype, &patches, vae, offload)?;
    sd.vae_tiling = job.vae_tiling;
    let preview = match &job.taesd {
        Some(t) => sd_pipeline::generation::preview::PreviewDecoder::Taesd(Arc::new(
            sd_pipeline::model::taesd::AutoencoderTiny::load(t, &device, dtype)
                .map_err(|e| format!("taesd {e}"))?,
        )),
        None => Default::default(),
    };
    let refiner = match &job.refiner {
        Some(r) => {
            // a regular file or a folder (never a FIFO or a device), as every model path
            sd_plugins_api::input_file::check_file_or_folder(r)
                .map_err(|e| format!("refiner {e}"))?;
            let r = StableDiffusion::load_placed(r, &device, dtype, &[], None, offload)
                .map_err(|e| format!("refiner: {e}"))?;
            if !sd.is_sdxl() || !r.is_sdxl() {
                return Err(format!(
                    "a refiner works with SDXL models: the model is {}, the refiner {}",
                    sd.family(),
                    r.family()
                )
                .into());
            }
            Some(r)
        }
        None => None,
    };
    let mut refiner = refiner;
    let embeddings_skipped = match &job.embeddings_dir {
        Some(dir) => load_embeddings(dir, &mut sd, refiner.as_mut())?,
        None => Vec::new(),
    };
    Ok(Loaded {
        tiny_vae,
        preview,
        embeddings_skipped,
        refiner,
        sd,
        model,
        prompt,
        loras,
        lora_reports,
        plugins,
        device,
    })
}

/// Give the model (and the refiner) the embeddings of `dir` that fit it. Files that are no
/// embedding, and embeddings for another model family, are skipped with a warning, as A1111
/// does; the list of them is returned.
fn load_embeddings(
    dir: &Path,
    sd: &mut StableDiffusion,
    refiner: Option<&mut StableDiffusion>,
) -> Result<Vec<(String, String)>> {
    let scan =
        sd_pipeline::text::embeddings::scan_dir(dir).map_err(|e| format!("embeddings_dir: {e}"))?;
    let mut skipped: Vec<(String, String)> = scan
        .skipped
        .iter()
        .map(|(p, why)| (p.display().to_string(), why.clone()))
        .collect();
    for (name, why) in sd.set_embeddings(&scan.loaded) {
        let file = scan
            .loaded
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.path.display().to_string());
        skipped.push((file.unwrap_or(name), why));
    }
    if let Some(r) = refiner {
        r.set_embeddings(&scan.loaded);
    }
    Ok(skipped)
}

/// Writes a preview of the latents to `path` after every step (atomically: a viewer that
/// reloads the file never sees half of one).
struct PreviewHook {
    path: PathBuf,
    decoder: sd_pipeline::generation::preview::PreviewDecoder,
}

impl Hook for PreviewHook {
    fn name(&self) -> &str {
        "preview"
    }

    fn after_step(
        &mut self,
        _step: &sd_plugins_api::StepInfo,
        _levels: &dyn sd_plugins_api::NoiseLevels,
        latents: &mut Tensor,
    ) -> std::result::Result<(), sd_plugins_api::HookError> {
        let fail = |m: String| sd_plugins_api::HookError::Failed {
            hook: "preview".into(),
            message: m,
        };
        let Some((w, h, rgb)) =
            sd_pipeline::generation::preview::preview_rgb(latents, &self.decoder)
                .map_err(|e| fail(e.to_string()))?
        else {
            return Ok(());
        };
        let img = Tensor::from_vec(rgb, (h, w, 3), &Device::Cpu)
            .and_then(|t| t.permute((2, 0, 1))?.to_dtype(DType::F32)? / 255.0)
            .map_err(|e| fail(e.to_string()))?;
        sd_pipeline::generation::image_io::save_png(&self.path, &img, &[])
            .map_err(|e| fail(format!("{}: {e}", self.path.display())))
    }
}

/// depth2img's depth map `[1, 1, h, w]`: a PNG's first channel (8 or 16 bit), or what the
/// named preprocessor (e.g. `depth_anything_v2`) makes of the init image.
fn depth_map(
    job: &Job,
    registry: &Registry,
    width: usize,
    height: usize,
) -> Result<Option<Tensor>> {
    let (h, w, v): (usize, usize, Vec<f32>) = match (&job.depth_map, &job.depth_estimator) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => return Err("give a depth map or a depth estimator, not both".into()),
        (Some(p), None) => {
            let img = open_image(p)?.to_luma16();
            let (w, h) = img.dimensions();
            (
                h as usize,
                w as usize,
                img.into_raw().into_iter().map(f32::from).collect(),
            )
        }
        (None, Some(name)) => {
            let init = job
                .init_image
                .as_deref()
                .ok_or("a depth estimator reads the init image: give one")?;
            let p = registry
                .preprocessor(name)
                .ok_or_else(|| format!("depth_estimator: no preprocessor {name:?}"))?;
            let params = sd_controlnet::spec::PreprocessorChoice::named(name.clone())
                .resolve(registry)
                .map_err(|e| format!("depth_estimator: {}", e.join("; ")))?;
            let sizing = sd_preprocessors::detect::Sizing {
                resolution: 512,
                pad: false,
            };
            let map = sd_preprocessors::detect::detect_file(
                registry,
                p.as_ref(),
                init,
                &params,
                sizing,
                (width, height),
            )
            .map_err(|e| format!("depth_estimator {name}: {e}"))?
            .map;
            let c = map.channels;
            (
                map.height,
                map.width,
                map.data.iter().step_by(c).map(|&b| b as f32).collect(),
            )
        }
    };
    if v.iter().all(|&x| x == v[0]) {
        return Err("the depth map is flat (one value): it gives no depth".into());
    }
    Ok(Some(Tensor::from_vec(v, (1, 1, h, w), &Device::Cpu)?))
}

/// The generation size: the job's, else the init image's, else the model's own.
fn size(job: &Job, sd: &StableDiffusion) -> Result<(usize, usize)> {
    let f = sd.vae_scale_factor();
    // a size that was given is blamed as such
    for (name, v) in [("--width", job.width), ("--height", job.height)] {
        if let Some(v) = v.filter(|&v| v == 0 || v % f != 0) {
            return Err(format!("{name} {v} is not a positive multiple of {f}").into());
        }
    }
    let (width, height) = match (&job.init_image, job.width, job.height) {
        (_, Some(w), Some(h)) => (w, h),
        (Some(img), w, h) => {
            let (iw, ih) = image_size(img)?;
            // outpainting renders the padded image
            let (iw, ih) = match &job.outpaint {
                Some(o) => {
                    let (pw, ph) = o.size(iw as u32, ih as u32);
                    (pw as usize, ph as usize)
                }
                None => (iw, ih),
            };
            let (width, height) = (w.unwrap_or(iw), h.unwrap_or(ih));
            if width % f != 0 || height % f != 0 {
                let missing = match (w, h) {
                    (None, None) => "--width and --height",
                    (None, _) => "--width",
                    _ => "--height",
                };
                return Err(format!(
                    "--init-image {}: the image is {iw}x{ih} pixels and its size is used for \
                     the output, which must be a multiple of {f} on each side; resize the \
                     image or give {missing} (a multiple of {f})",
                    img.display()
                )
                .into());
            }
            (width, height)
        }
        // the size the model was trained at (diffusers' default)
        (None, w, h) => {
            let (dw, dh) = sd.default_size();
            (w.unwrap_or(dw), h.unwrap_or(dh))
        }
    };
    Ok((width, height))
}

/// A seed from the clock, for jobs that give none.
pub fn draw_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 & 0xffff_ffff)
        .unwrap_or(0)
}

/// Load the job's model and run the job; `hooks` (progress bars, previews) run after the
/// job's own (ControlNets, plugins).
pub fn generate(job: &Job, registry: &Registry, hooks: Vec<Box<dyn Hook>>) -> Result<Generation> {
    let t0 = Instant::now();
    let loaded = load(job)?;
    let load_time = t0.elapsed();
    let mut g = run(&loaded, job, registry, hooks)?;
    g.timings.load = load_time;
    Ok(g)
}

/// The decoded images `[batch, 3, H, W]` through the inpainting steps' last part (the crop
/// pasted back, the original over the unmasked part).
fn finish_inpainting(p: &crate::inpaint::Prepared, images: &Tensor) -> Result<Tensor> {
    let mut out = Vec::new();
    for i in 0..images.dim(0)? {
        let (w, h, px) = to_rgb8(&images.get(i)?)?;
        let rgb = image::RgbImage::from_raw(w as u32, h as u32, px)
            .ok_or("a decoded image of the wrong size")?;
        let done = p.finish(rgb);
        let (w, h) = done.dimensions();
        let data: Vec<f32> = done
            .into_raw()
            .into_iter()
            .map(|v| v as f32 / 255.0)
            .collect();
        out.push(
            Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?
                .permute((2, 0, 1))?
                .to_device(images.device())?,
        );
    }
    Ok(Tensor::stack(&out, 0)?)
}

/// Run the job on a model loaded for it by [`load`].
pub fn run(
    loaded: &Loaded,
    job: &Job,
    registry: &Registry,
    extra_hooks: Vec<Box<dyn Hook>>,
) -> Result<Generation> {
    check_prompt_lengths(job)?;
    let sd = &loaded.sd;
    let device = &loaded.device;
    let noise = job.noise.as_deref().map(load_noise).transpose()?;
    let (width, height) = size(job, sd)?;
    // every size source (flags, config files, the init image, the UNet's sample_size) against
    // the memory estimate, before any image or tensor of that size exists
    sd.check_memory(
        width,
        height,
        job.batch,
        job.cfg_scale > 1.0,
        job.control.len(),
    )?;
    let seed = job.seed.unwrap_or_else(draw_seed);
    // A1111's image steps around inpainting, when asked for; outpainting pads the init image
    // and makes the mask, with the feather as the mask blur
    let inpaint = match (&job.outpaint, &job.init_image, &job.mask) {
        (Some(_), None, _) => return Err("outpaint needs an init image".into()),
        (Some(_), _, Some(_)) => return Err("outpaint makes its own mask: drop the mask".into()),
        (Some(o), Some(i), None) => {
            let (padded, mask) = o.pad(&open_image(i)?.to_rgb8(), seed);
            let mut steps = job.inpaint;
            if steps.mask_blur == 0 {
                steps.mask_blur = o.feather;
            }
            steps.overlay = true;
            Some(crate::inpaint::prepare(
                &DynamicImage::ImageRgb8(padded),
                &DynamicImage::ImageLuma8(mask),
                width,
                height,
                &steps,
            ))
        }
        _ => None,
    };
    let inpaint = match (inpaint, &job.init_image, &job.mask) {
        (Some(p), _, _) => Some(p),
        (None, Some(i), Some(m)) if !job.inpaint.is_plain() => Some(crate::inpaint::prepare(
            &open_image(i)?,
            &open_image(m)?,
            width,
            height,
            &job.inpaint,
        )),
        _ => None,
    };
    let (init_image, mask) = match &inpaint {
        Some(p) => (
            Some(image_tensor(
                DynamicImage::ImageRgb8(p.init.clone()),
                width,
                height,
                device,
            )?),
            p.mask
                .clone()
                .map(|m| mask_tensor(DynamicImage::ImageLuma8(m), width, height, device))
                .transpose()?,
        ),
        None => (
            job.init_image
                .as_deref()
                .map(|p| load_image(p, width, height, device))
                .transpose()?,
            job.mask
                .as_deref()
                .map(|p| load_mask(p, width, height, device))
                .transpose()?,
        ),
    };
    // the prompt without its LoRA tags; those tags' LoRAs are the ones `loaded` holds
    let (prompt, loras) = resolve_loras(job)?;
    if loras != loaded.loras {
        return Err("the job's LoRAs differ from those the model was loaded with".into());
    }
    let mut req = GenerateRequest {
        prompt,
        negative_prompt: job.negative_prompt.clone(),
        width,
        height,
        steps: job.steps,
        cfg_scale: job.cfg_scale,
        sampler: job.sampler,
        schedule: job.schedule,
        batch: job.batch,
        clip_skip: job.clip_skip,
        init_image,
        mask,
        strength: job.strength,
        noise,
        latent_fill: match job.mask {
            Some(_) => job.inpaint.fill.latent(),
            None => Default::default(),
        },
        micro: job.micro,
        init_latents: None,
        run_steps: None,
        depth: None,
    };
    req.depth = depth_map(job, registry, width, height)?;
    sd.validate(&req)?;
    // the hires pass's request, checked before the first pass runs
    let hires = match &job.hires {
        Some(h) => Some(crate::hires::plan(h, job.refiner.is_some(), &req, sd)?),
        None => None,
    };
    // Every ControlNet, control image and mask is loaded and checked before denoising starts
    // (a unit acts on the passes its `hr` option names).
    let t_units = Instant::now();
    let mut cache = Vec::new();
    let units_for = |first: bool, w: usize, h: usize, cache: &mut Vec<_>| {
        job.control
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                job.hires.is_none()
                    || if first {
                        c.hr.first_pass()
                    } else {
                        c.hr.second_pass()
                    }
            })
            .map(|(i, c)| {
                c.spec
                    .build(sd, w, h, cache, registry)
                    .map_err(|e| format!("control[{i}]: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let mut units = units_for(true, width, height, &mut cache)?;
    let mut hr_units = match &hires {
        Some(p) => units_for(false, p.req.width, p.req.height, &mut cache)?,
        None => Vec::new(),
    };
    // reference-only units draw their noise from the generation's seed
    for u in units.iter_mut().chain(hr_units.iter_mut()) {
        if let sd_controlnet::Unit::Reference(r) = u {
            r.seed = seed;
        }
    }
    let controls = t_units.elapsed();

    let mut hooks = HookSet::new();
    for i in &loaded.plugins {
        hooks.push(i.hook());
    }
    for h in extra_hooks {
        hooks.push(h);
    }
    if let Some(p) = &job.preview_path {
        hooks.push(Box::new(PreviewHook {
            path: p.clone(),
            decoder: loaded.preview.clone(),
        }));
    }
    let control_hook = |units: Vec<_>| -> Vec<Box<dyn Hook>> {
        if units.is_empty() {
            Vec::new()
        } else {
            vec![Box::new(ControlNetHook::new(units))]
        }
    };
    let new_rng = || -> Box<dyn NoiseSource> {
        match job.rng {
            Rng::Philox => Box::new(PhiloxRng::new(seed)),
            Rng::TorchCpu => Box::new(TorchRng::new(seed)),
        }
    };
    let mut rng = new_rng();
    let t_sampling = Instant::now();
    let refiner = loaded.refiner.as_ref().map(|r| (r, job.refiner_switch));
    let explain = |e| crate::non_finite::explain(e, &loaded.model, &loaded.loras, job);
    let mut latents = {
        let mut pass = hooks.with_leading(control_hook(units));
        sd.denoise_refined(&req, refiner, &mut pass, rng.as_mut())
            .map_err(explain)?
    };
    // A1111's hires pass: the result enlarged, then img2img at the larger size from noise
    // drawn again from the seed
    // (the infotext records the first pass's request and the hires settings, as A1111's)
    let (width, height) = match hires {
        Some(mut p) => {
            p.req.init_latents = Some(crate::hires::upscale(
                sd,
                &p,
                &latents,
                job.upscaler_dir.as_deref(),
            )?);
            let mut pass = hooks.with_leading(control_hook(hr_units));
            latents = sd
                .denoise(&p.req, &mut pass, new_rng().as_mut())
                .map_err(explain)?;
            (p.req.width, p.req.height)
        }
        None => (width, height),
    };
    let sampling = t_sampling.elapsed();

    let t_dec = Instant::now();
    let mut images = match &loaded.tiny_vae {
        Some(t) => t.decode_images(&latents),
        None => sd.decode_latents(&latents),
    }
    .map_err(|e| crate::non_finite::explain(e, &loaded.model, &loaded.loras, job))?;
    hooks.on_image(&mut images)?;
    if let Some(p) = &inpaint {
        images = finish_inpainting(p, &images)?;
    }
    let decode = t_dec.elapsed();

    let seed = job.noise.is_none().then_some(seed);
    // the embeddings the prompts use, for the infotext's "TI hashes"
    let mut used = sd.embeddings_used(&req.prompt)?;
    if let Some(n) = &req.negative_prompt {
        used.extend(sd.embeddings_used(n)?);
    }
    let embeddings: Vec<(String, PathBuf)> = sd
        .embeddings
        .items()
        .iter()
        .filter(|t| used.contains(&t.name))
        .map(|t| (t.name.clone(), t.path.clone()))
        .collect();
    let info = Run {
        job,
        embeddings: &embeddings,
        req: &req,
        seed,
        model: &loaded.model,
        loras: &loaded.loras,
    };
    let mut hashes = HashCache::open();
    let parameters = info.parameters(&mut hashes);
    let settings_json = info.settings_json(&mut hashes).to_string();
    hashes.save();
    Ok(Generation {
        images,
        latents,
        seed,
        width,
        height,
        loras: loaded.loras.clone(),
        lora_reports: loaded.lora_reports.clone(),
        parameters,
        settings_json,
        timings: Timings {
            load: Duration::ZERO,
            controls,
            sampling,
            decode,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A library caller's refiner that is a named pipe is refused, not read (no hang).
    #[test]
    fn a_refiner_that_is_a_pipe_is_refused() {
        let dir = std::env::temp_dir().join(format!("sd-refiner-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("refiner");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let job = Job {
            model: Some(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/sdxl"),
            ),
            refiner: Some(fifo.clone()),
            ..Job::default()
        };
        let err = load(&job).err().expect("refused").to_string();
        assert!(
            err.contains("refiner") && err.contains("named pipe"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A library caller's megabytes of prompt are refused before anything is loaded.
    #[test]
    fn long_prompts_are_refused_before_loading() {
        let job = Job {
            negative_prompt: Some("x".repeat(5 << 20)),
            ..Job::default()
        };
        let err = load(&job).err().expect("refused").to_string();
        assert!(
            err.starts_with("negative_prompt: 5242880 bytes, more than the 64 KiB"),
            "{err}"
        );
        let ok = Job {
            prompt: "x".repeat(1000),
            ..Job::default()
        };
        assert!(check_prompt_lengths(&ok).is_ok());
    }
}
