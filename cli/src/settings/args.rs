//! The flags: one per setting, named as its config key with `-` for `_`. They form the top
//! layer; `--control` and `--lora` append to the lists from config files.

use std::path::PathBuf;

use clap::Args;
use figment::value::{Dict, Value};

use sd::config::problem::{Origin, Problem};

#[derive(Args, Debug, Clone, Default)]
pub struct SettingsArgs {
    /// A config file (TOML, YAML or JSON), repeatable: later files override earlier ones,
    /// [[control]] and [[lora]] lists are concatenated
    #[arg(long = "config", value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// Start from the settings stored in a PNG (ours, or AUTOMATIC1111's infotext); config
    /// files, environment and flags still override them
    #[arg(long, value_name = "IMAGE.png")]
    pub from_png: Option<PathBuf>,
    /// The model: a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/), a single-file checkpoint (A1111/ComfyUI .safetensors or .ckpt, with an
    /// optional NAME.yaml beside it), or a Hugging Face repo id (owner/name)
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A VAE to use instead of the model's own (A1111 VAE files such as
    /// vae-ft-mse-840000-ema-pruned.safetensors, LDM or diffusers names)
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// An SDXL refiner (diffusers folder, e.g. stable-diffusion-xl-refiner-1.0) for the last
    /// steps
    #[arg(long)]
    pub refiner: Option<PathBuf>,
    /// When the refiner takes over, as a fraction of the schedule (A1111's "Switch at")
    /// [default: 0.8]
    #[arg(long)]
    pub refiner_switch: Option<f64>,
    /// The prompt; A1111 syntax: (word:1.2), [word], BREAK, <lora:NAME:WEIGHT>
    #[arg(long)]
    pub prompt: Option<String>,
    /// Hires fix (A1111): a second pass at this scale of the size (turns the fix on)
    #[arg(long)]
    pub hires_scale: Option<f64>,
    /// Hires fix at this size instead of a scale: WxH (0 for a side = keep the aspect ratio)
    #[arg(long, value_name = "WxH")]
    pub hires_size: Option<String>,
    /// Hires upscaler: latent | latent-antialiased | latent-bicubic |
    /// latent-bicubic-antialiased | latent-nearest | latent-nearest-exact | lanczos | nearest |
    /// an ESRGAN / Real-ESRGAN model (its name in --upscaler-dir, or a path) [default: latent]
    #[arg(long)]
    pub hires_upscaler: Option<String>,
    /// Where --hires-upscaler finds ESRGAN / Real-ESRGAN models by name
    #[arg(long, value_name = "DIR")]
    pub upscaler_dir: Option<PathBuf>,
    /// Hires pass steps (0 = the first pass's) [default: 0]
    #[arg(long)]
    pub hires_steps: Option<i64>,
    /// Hires pass denoising strength [default: 0.7]
    #[arg(long)]
    pub hires_denoise: Option<f64>,
    /// Hires pass prompt [default: the prompt]
    #[arg(long)]
    pub hires_prompt: Option<String>,
    /// Hires pass negative prompt [default: the negative prompt]
    #[arg(long)]
    pub hires_negative_prompt: Option<String>,
    /// Hires pass sampler [default: the sampler]
    #[arg(long)]
    pub hires_sampler: Option<String>,
    /// Hires pass schedule [default: the schedule]
    #[arg(long)]
    pub hires_schedule: Option<String>,
    /// The negative prompt. Absent, SDXL base models use zeros (diffusers'
    /// force_zeros_for_empty_prompt); given, even "", it is encoded
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// SDXL: the original_size conditioning, WxH [default: the image size]
    #[arg(long)]
    pub original_size: Option<String>,
    /// SDXL: the target_size conditioning, WxH [default: the image size]
    #[arg(long)]
    pub target_size: Option<String>,
    /// SDXL: the crop conditioning's top-left corner, X,Y [default: 0,0]
    #[arg(long)]
    pub crop_top_left: Option<String>,
    /// Image width (multiple of 8); default the init image's width, else the model's own
    /// (diffusers: UNet sample_size x VAE scale: 512 for SD1, 768 for SD2-768)
    #[arg(long)]
    pub width: Option<i64>,
    /// Image height (multiple of 8); default the init image's height, else the model's own
    #[arg(long)]
    pub height: Option<i64>,
    /// Denoising steps [default: 20]
    #[arg(long)]
    pub steps: Option<i64>,
    /// Classifier-free guidance scale [default: 7.5]
    #[arg(long)]
    pub cfg_scale: Option<f64>,
    /// ddim | euler | euler_a | dpmpp_2m | dpmpp_2m_sde | dpmpp_sde | heun | lms | unipc | lcm
    /// [default: dpmpp_2m] (A1111, ComfyUI and diffusers names work too: "DPM++ 2M Karras",
    /// "Euler a", euler_ancestral, DPMSolverMultistepScheduler)
    #[arg(long)]
    pub sampler: Option<String>,
    /// normal | karras | exponential | beta | sgm_uniform | simple (default karras, normal for
    /// lcm, or what the sampler name says)
    #[arg(long)]
    pub schedule: Option<String>,
    /// Seed of the noise (drawn by --rng); random if absent
    #[arg(long)]
    pub seed: Option<i64>,
    /// Noise generator: torch-cpu (torch.Generator("cpu"), diffusers' usual) or philox
    /// (torch.randn on CUDA, as AUTOMATIC1111's NV source) [default: torch-cpu]
    #[arg(long)]
    pub rng: Option<String>,
    /// Images generated at once [default: 1]
    #[arg(long)]
    pub batch: Option<i64>,
    /// CLIP layers to skip, A1111 numbering: 1 = last layer, 2 = penultimate [default: 1]
    #[arg(long)]
    pub clip_skip: Option<i64>,
    /// Source image for img2img, or for inpainting with --mask
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Denoising strength in (0, 1]; default 0.8 for img2img, 1.0 for inpainting
    #[arg(long)]
    pub strength: Option<f64>,
    /// Inpainting mask (white = repaint)
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Blur the inpainting mask by this sigma in pixels (A1111's "Mask blur") [default: 0]
    #[arg(long)]
    pub mask_blur: Option<i64>,
    /// Repaint where the mask is black (A1111's "Inpaint not masked")
    #[arg(long)]
    pub invert_mask: bool,
    /// Inpaint the whole picture, or only the masked region at the generation size, pasted
    /// back (A1111's "Only masked") [default: whole]
    #[arg(long, value_name = "whole|masked")]
    pub inpaint_area: Option<String>,
    /// Pixels around the masked region with --inpaint-area masked [default: 0]
    #[arg(long)]
    pub inpaint_padding: Option<i64>,
    /// Paste the original over the result where the mask is black (A1111 does)
    #[arg(long)]
    pub mask_overlay: bool,
    /// What the masked part starts from: the original image, its surroundings' colours blurred
    /// in, the initial noise or zeros in the latents (A1111's "Masked content") [default: original]
    #[arg(long, value_name = "original|fill|latent-noise|latent-nothing")]
    pub inpaint_fill: Option<String>,
    /// safetensors file with one f32 tensor `noise` [batch, 4, H/8, W/8] replacing the initial noise
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Write the final latents (before VAE decoding) as tensor `latents` to this safetensors file
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Output PNG; with batch N > 1, OUT-0.png, OUT-1.png, ...
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// cpu | cuda | cuda:N [default: cpu]
    #[arg(long)]
    pub device: Option<String>,
    /// f32 | f16 | bf16 (model weights and activations; on the CPU f16 / bf16 keep f32 tensors
    /// and multiply in f16 (AVX512-FP16) / bf16 (AVX512-BF16)) [default: f32]
    #[arg(long)]
    pub dtype: Option<String>,
    /// The text encoders and the VAE on the CPU in f32, so that the GPU holds only the UNet
    /// and the ControlNets (stable-diffusion.cpp's --clip-on-cpu --vae-on-cpu)
    #[arg(long)]
    pub lowvram: bool,
    /// A control unit, repeatable: model=PATH,image=PATH[,weight=F][,start=F][,end=F]
    /// [,mode=balanced|prompt|control][,resize=just|crop|fill][,preprocessor=NAME][,resolution=N]
    /// [,mask=PATH][,id=NAME][,type=openpose|depth|hed|canny|normal|segment|tile|repaint
    /// (union ControlNets)]
    #[arg(long = "control", value_name = "KEY=VALUE,...")]
    pub control: Vec<String>,
    /// A LoRA, repeatable: PATH[:WEIGHT] (weight for UNet and text encoder, default 1)
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    pub lora: Vec<String>,
    /// Where `<lora:NAME:WEIGHT>` prompt tags find NAME.safetensors
    #[arg(long)]
    pub lora_dir: Option<PathBuf>,
    /// Tiled VAE decode/encode: auto (when the image's VAE memory would pass 4 GiB) | on |
    /// off [default: auto]
    #[arg(long)]
    pub vae_tiling: Option<String>,
    /// VAE tile size in image pixels [default: the VAE's sample_size, 512 for SD 1.5]
    #[arg(long)]
    pub vae_tile_size: Option<i64>,
    /// VAE tile overlap, a fraction of a tile [default: 0.25]
    #[arg(long)]
    pub vae_tile_overlap: Option<f64>,
    /// depth2img with an SD 2 depth model: a depth map (grayscale PNG, 8 or 16 bit, larger =
    /// nearer)
    #[arg(long, value_name = "PNG")]
    pub depth_map: Option<PathBuf>,
    /// depth2img: estimate the depth map from the init image with this preprocessor (e.g.
    /// depth_anything_v2)
    #[arg(long, value_name = "NAME")]
    pub depth_estimator: Option<String>,
    /// Outpaint: pixels added to the init image's sides, repainted: LEFT,RIGHT,TOP,BOTTOM
    #[arg(long, value_name = "L,R,T,B")]
    pub outpaint: Option<String>,
    /// What the outpainted border starts as: edge | mirror | noise [default: edge]
    #[arg(long)]
    pub outpaint_fill: Option<String>,
    /// The outpainting mask's feather (A1111's mask blur, pixels) [default: 8]
    #[arg(long)]
    pub outpaint_feather: Option<i64>,
    /// Live previews while sampling: cheap (A1111's "Approx cheap", latent-sized) | taesd (with
    /// --taesd) | none; written to --preview-path, by default OUTPUT.preview.png
    #[arg(long)]
    pub preview: Option<String>,
    /// Write a live preview of the image to this PNG after every step (for a viewer that
    /// reloads it)
    #[arg(long, value_name = "PNG")]
    pub preview_path: Option<PathBuf>,
    /// A TAESD / TAESDXL decoder (folder or taesd_decoder file) for the previews (without
    /// it: A1111's "Approx cheap", latent-sized)
    #[arg(long, value_name = "PATH")]
    pub taesd: Option<PathBuf>,
    /// Textual-inversion embeddings (A1111 .pt, .safetensors, .bin; SDXL clip_l/clip_g): a
    /// prompt naming a file's stem gets its vectors
    #[arg(long)]
    pub embeddings_dir: Option<PathBuf>,
    /// Fail when a LoRA has keys that match nothing in the model (otherwise they are reported)
    #[arg(long)]
    pub strict_lora: bool,
    /// A plugin to load, repeatable: PATH[,PARAM=VALUE]... (a hook plugin runs in generation
    /// with these parameters; a preprocessor plugin becomes available by name)
    #[arg(long = "plugin", value_name = "PATH[,PARAM=VALUE]...")]
    pub plugin: Vec<String>,
    /// Folder whose plugins are loaded (and usable by name) [default: CONFIG_DIR/sdctl/plugins]
    #[arg(long)]
    pub plugin_dir: Option<PathBuf>,
    /// Allow control weights outside [0, 2] and LoRA weights outside [-2, 2]
    #[arg(long)]
    pub allow_extreme_weights: bool,
}

fn path(p: &std::path::Path) -> Value {
    Value::from(p.to_string_lossy().to_string())
}

impl SettingsArgs {
    /// The flags as a layer (only those given).
    pub fn to_dict(&self, problems: &mut Vec<Problem>) -> Dict {
        let mut d = Dict::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                d.insert(k.into(), v);
            }
        };
        put("model", self.model.as_deref().map(path));
        put("vae", self.vae.as_deref().map(path));
        put("refiner", self.refiner.as_deref().map(path));
        put("refiner_switch", self.refiner_switch.map(Value::from));
        put("hires_scale", self.hires_scale.map(Value::from));
        put("hires_size", self.hires_size.clone().map(Value::from));
        put(
            "hires_upscaler",
            self.hires_upscaler.clone().map(Value::from),
        );
        put("hires_steps", self.hires_steps.map(Value::from));
        put("upscaler_dir", self.upscaler_dir.as_deref().map(path));
        put("hires_denoise", self.hires_denoise.map(Value::from));
        put("hires_prompt", self.hires_prompt.clone().map(Value::from));
        put(
            "hires_negative_prompt",
            self.hires_negative_prompt.clone().map(Value::from),
        );
        put("hires_sampler", self.hires_sampler.clone().map(Value::from));
        put(
            "hires_schedule",
            self.hires_schedule.clone().map(Value::from),
        );
        put("prompt", self.prompt.clone().map(Value::from));
        put(
            "negative_prompt",
            self.negative_prompt.clone().map(Value::from),
        );
        put("original_size", self.original_size.clone().map(Value::from));
        put("target_size", self.target_size.clone().map(Value::from));
        put("crop_top_left", self.crop_top_left.clone().map(Value::from));
        put("width", self.width.map(Value::from));
        put("height", self.height.map(Value::from));
        put("steps", self.steps.map(Value::from));
        put("cfg_scale", self.cfg_scale.map(Value::from));
        put("sampler", self.sampler.clone().map(Value::from));
        put("schedule", self.schedule.clone().map(Value::from));
        put("seed", self.seed.map(Value::from));
        put("rng", self.rng.clone().map(Value::from));
        put("batch", self.batch.map(Value::from));
        put("clip_skip", self.clip_skip.map(Value::from));
        put("init_image", self.init_image.as_deref().map(path));
        put("strength", self.strength.map(Value::from));
        put("mask", self.mask.as_deref().map(path));
        put("mask_blur", self.mask_blur.map(Value::from));
        put("invert_mask", self.invert_mask.then_some(Value::from(true)));
        put("inpaint_area", self.inpaint_area.clone().map(Value::from));
        put("inpaint_padding", self.inpaint_padding.map(Value::from));
        put(
            "mask_overlay",
            self.mask_overlay.then_some(Value::from(true)),
        );
        put("inpaint_fill", self.inpaint_fill.clone().map(Value::from));
        put("noise", self.noise.as_deref().map(path));
        put("save_latents", self.save_latents.as_deref().map(path));
        put("output", self.output.as_deref().map(path));
        put("device", self.device.clone().map(Value::from));
        put("dtype", self.dtype.clone().map(Value::from));
        put("lowvram", self.lowvram.then_some(Value::from(true)));
        put("lora_dir", self.lora_dir.as_deref().map(path));
        put("embeddings_dir", self.embeddings_dir.as_deref().map(path));
        put("preview", self.preview.clone().map(Value::from));
        put("preview_path", self.preview_path.as_deref().map(path));
        put("outpaint", self.outpaint.clone().map(Value::from));
        put("depth_map", self.depth_map.as_deref().map(path));
        put(
            "depth_estimator",
            self.depth_estimator.clone().map(Value::from),
        );
        put("vae_tiling", self.vae_tiling.clone().map(Value::from));
        put("vae_tile_size", self.vae_tile_size.map(Value::from));
        put("vae_tile_overlap", self.vae_tile_overlap.map(Value::from));
        put("outpaint_fill", self.outpaint_fill.clone().map(Value::from));
        put("outpaint_feather", self.outpaint_feather.map(Value::from));
        put("taesd", self.taesd.as_deref().map(path));
        put("plugin_dir", self.plugin_dir.as_deref().map(path));
        put("strict_lora", self.strict_lora.then_some(Value::from(true)));
        put(
            "allow_extreme_weights",
            self.allow_extreme_weights.then_some(Value::from(true)),
        );
        let mut units = Vec::new();
        for (i, c) in self.control.iter().enumerate() {
            match control_table(c) {
                Ok(t) => units.push(Value::from(t)),
                Err(m) => problems.push(Problem::at(
                    &Origin::Flag(format!("--control #{}", i + 1)),
                    "",
                    m,
                )),
            }
        }
        if !units.is_empty() {
            d.insert("control".into(), Value::from(units));
        }
        let mut plugins = Vec::new();
        for (i, p) in self.plugin.iter().enumerate() {
            let mut parts = p.split(',');
            let mut t = Dict::new();
            t.insert(
                "path".into(),
                Value::from(parts.next().unwrap_or("").to_string()),
            );
            match control_table(&parts.collect::<Vec<_>>().join(",")) {
                Ok(params) => {
                    t.extend(params);
                    plugins.push(Value::from(t));
                }
                Err(m) => problems.push(Problem::at(
                    &Origin::Flag(format!("--plugin #{}", i + 1)),
                    "",
                    m,
                )),
            }
        }
        if !plugins.is_empty() {
            d.insert("plugins".into(), Value::from(plugins));
        }
        let mut loras: Vec<Value> = Vec::new();
        for (i, l) in self.lora.iter().enumerate() {
            match lora_table(l) {
                Ok(t) => loras.push(Value::from(t)),
                Err(m) => problems.push(Problem::at(
                    &Origin::Flag(format!("--lora #{}", i + 1)),
                    "",
                    m,
                )),
            }
        }
        if !loras.is_empty() {
            d.insert("lora".into(), Value::from(loras));
        }
        d
    }
}

/// `model=PATH,image=PATH,weight=0.7,...` as a table of strings (typed when checked).
fn control_table(s: &str) -> Result<Dict, String> {
    let mut d = Dict::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected KEY=VALUE"))?;
        d.insert(k.trim().into(), Value::from(v.trim().to_string()));
    }
    Ok(d)
}

/// `PATH[:WEIGHT]` as a `[[lora]]` table (parsed as `sd_lora::LoraSpec::parse` does).
/// A weight that is not a number is an error naming it.
fn lora_table(s: &str) -> Result<Dict, String> {
    let spec = sd_lora::LoraSpec::parse(s).map_err(|e| e.to_string())?;
    let mut d = Dict::new();
    d.insert("path".into(), path(&spec.path));
    d.insert("weight".into(), Value::from(spec.unet_weight));
    Ok(d)
}
