//! The denoising loop: txt2img, img2img and inpainting (9-channel inpaint UNets, and mask
//! blending for ordinary 4-channel models), calling the hook points of `sd-plugins-api`.
//! Mirrors diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline step for step.

use candle_core::{DType, Tensor};
use sd_plugins_api::{
    AddedCond, Conditioning, Hook, HookError, HookSet, NoiseLevels, NoisePrediction, ResidualInput,
    StepInfo,
};

use crate::error::{Error, Result};
use crate::rng::NoiseSource;
use crate::samplers::{build_sampler, img2img_start_index, Sampler, SamplerKind, Schedule};
use crate::stable_diffusion::StableDiffusion;
use crate::text::{encode_prompts_dual_with, encode_prompts_with};

/// What to generate. Images and masks are tensors already prepared by `image_io`.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    /// `None`: no negative prompt given. SD 1.x/2.x encode the empty prompt then; SDXL
    /// models whose `model_index.json` sets `force_zeros_for_empty_prompt` use zeros
    /// (diffusers). A given negative prompt, even `""`, is encoded.
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: SamplerKind,
    pub schedule: Schedule,
    pub batch: usize,
    pub clip_skip: usize,
    /// img2img / inpaint source, `[1, 3, height, width]` in [-1, 1].
    pub init_image: Option<Tensor>,
    /// Inpaint mask, `[1, 1, height, width]`, 1 = repaint.
    pub mask: Option<Tensor>,
    /// Denoising strength; defaults: 0.8 for img2img, 1.0 with a mask (diffusers).
    pub strength: Option<f64>,
    /// Replaces the initial noise draw, `[batch, C, height/f, width/f]`.
    pub noise: Option<Tensor>,
    /// What the init image's latents hold under the mask before noise is added (A1111's
    /// `inpainting_fill` 2 and 3); the init image's own by default.
    pub latent_fill: LatentFill,
    /// SDXL's size and crop conditioning (ignored by SD 1.x/2.x).
    pub micro: MicroConditioning,
    /// Start from these (scaled) latents, `[1 or batch, C, height/f, width/f]`, instead of
    /// encoding `init_image`: the hires fix's latent upscale.
    pub init_latents: Option<Tensor>,
    /// Run the last `n` steps of the `steps`-step schedule (A1111's img2img with fixed steps,
    /// as its hires pass runs) instead of diffusers' `int(steps * strength)`.
    pub run_steps: Option<usize>,
    /// A depth map for a depth model (depth2img), `[1, 1, h, w]` of any size and scale,
    /// larger = nearer: resized to the latents (bicubic) and scaled to [-1, 1] (diffusers'
    /// `prepare_depth_map`).
    pub depth: Option<Tensor>,
}

/// SDXL's micro-conditioning (diffusers' `original_size`, `crops_coords_top_left`,
/// `target_size`; A1111's sgm conditioner): sizes as (width, height), the crop as (x, y) =
/// (left, top). The UNet sees them as `[orig_h, orig_w, top, left, target_h, target_w]`, or
/// the refiner as `[orig_h, orig_w, top, left, aesthetic_score]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroConditioning {
    /// `None`: the generation size.
    pub original_size: Option<(usize, usize)>,
    /// `None`: the generation size.
    pub target_size: Option<(usize, usize)>,
    pub crop_top_left: (usize, usize),
    /// The refiner's aesthetic score for the prompt and the negative (diffusers: 6.0, 2.5).
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
}

impl Default for MicroConditioning {
    fn default() -> Self {
        Self {
            original_size: None,
            target_size: None,
            crop_top_left: (0, 0),
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

impl MicroConditioning {
    /// A size as `WxH` (config keys and flags `original_size`, `target_size`).
    pub fn parse_size(s: &str) -> std::result::Result<(usize, usize), String> {
        let bad = || format!("{s:?} is not a size WxH such as 1024x1024 (each side 1..=16384)");
        let (w, h) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
        let n = |v: &str| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|v| (1..=16384).contains(v))
        };
        Ok((n(w).ok_or_else(bad)?, n(h).ok_or_else(bad)?))
    }

    /// A crop corner as `X,Y` (left, top; config key and flag `crop_top_left`).
    pub fn parse_point(s: &str) -> std::result::Result<(usize, usize), String> {
        let bad = || format!("{s:?} is not a point X,Y such as 0,0 (each 0..=16384)");
        let (x, y) = s.trim().split_once(',').ok_or_else(bad)?;
        let n = |v: &str| v.trim().parse::<usize>().ok().filter(|v| *v <= 16384);
        Ok((n(x).ok_or_else(bad)?, n(y).ok_or_else(bad)?))
    }

    /// The six time ids for a `width` x `height` generation (diffusers `_get_add_time_ids`).
    pub fn time_ids(&self, width: usize, height: usize) -> [f32; 6] {
        let (ow, oh) = self.original_size.unwrap_or((width, height));
        let (tw, th) = self.target_size.unwrap_or((width, height));
        let (x, y) = self.crop_top_left;
        [oh, ow, y, x, th, tw].map(|v| v as f32)
    }

    /// The refiner's five time ids (the img2img pipeline with `requires_aesthetics_score`),
    /// for the prompt or (`negative`) the negative prompt.
    pub fn aesthetic_time_ids(&self, width: usize, height: usize, negative: bool) -> [f32; 5] {
        let [oh, ow, y, x, ..] = self.time_ids(width, height);
        let score = if negative {
            self.negative_aesthetic_score
        } else {
            self.aesthetic_score
        };
        [oh, ow, y, x, score as f32]
    }
}

/// The init latents under an inpainting mask (`processing.py`, `inpainting_fill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LatentFill {
    /// The encoded init image (diffusers; A1111's "original").
    #[default]
    Original,
    /// The initial noise draw (A1111's "latent noise").
    Noise,
    /// Zeros (A1111's "latent nothing").
    Nothing,
}

impl GenerateRequest {
    /// A 512x512 txt2img request with sdctl's defaults (20 steps of DPM++ 2M Karras at CFG
    /// 7.5), the same as the `sd` crate's `Job`.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
            width: 512,
            height: 512,
            steps: 20,
            cfg_scale: 7.5,
            sampler: SamplerKind::DpmPP2M,
            schedule: Schedule::Karras,
            batch: 1,
            clip_skip: 1,
            init_image: None,
            mask: None,
            strength: None,
            noise: None,
            latent_fill: LatentFill::Original,
            micro: MicroConditioning::default(),
            init_latents: None,
            run_steps: None,
            depth: None,
        }
    }

    /// Whether it starts from an image or latents (img2img, inpainting, a hires pass).
    pub fn has_init(&self) -> bool {
        self.init_image.is_some() || self.init_latents.is_some()
    }

    /// The schedule index the loop starts at, in steps (before a two-evaluation sampler's
    /// doubling): 0 for txt2img, `steps - run_steps`, or diffusers' img2img start.
    pub fn start_step(&self) -> usize {
        match (self.has_init(), self.run_steps) {
            (false, _) => 0,
            (true, Some(n)) => self.steps.saturating_sub(n),
            (true, None) => img2img_start_index(self.steps, self.effective_strength()),
        }
    }

    /// The strength that applies: the given one, else 1.0 with a mask, 0.8 for img2img.
    pub fn effective_strength(&self) -> f64 {
        match (self.strength, &self.mask) {
            (Some(s), _) => s,
            (None, Some(_)) => 1.0,
            (None, None) => 0.8,
        }
    }
}

/// Final latents (before VAE decoding) and decoded images `[batch, 3, H, W]` in [0, 1].
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub latents: Tensor,
    pub images: Tensor,
}

struct Levels<'a>(&'a dyn Sampler);

impl NoiseLevels for Levels<'_> {
    fn timesteps(&self) -> &[f64] {
        self.0.timesteps()
    }
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        index: usize,
    ) -> candle_core::Result<Tensor> {
        self.0
            .add_noise(original, noise, index)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// Mask blending for 4-channel models (diffusers' inpaint pipeline): after each step, keep
/// the unmasked region of the source latents, re-noised to the next step's level. The loop
/// puts it in front of the caller's hooks for the generation, so it blends before any of
/// their `after_step`s sees the latents.
struct InpaintBlend {
    image_latents: Tensor,
    noise: Tensor,
    /// Latent-size mask, 1 = repaint.
    mask: Tensor,
}

impl Hook for InpaintBlend {
    fn name(&self) -> &str {
        "inpaint-blend"
    }
    fn after_step(
        &mut self,
        step: &StepInfo,
        levels: &dyn NoiseLevels,
        latents: &mut Tensor,
    ) -> Result<(), HookError> {
        let proper = if step.index + 1 < levels.timesteps().len() {
            levels.add_noise(&self.image_latents, &self.noise, step.index + 1)?
        } else {
            self.image_latents.clone()
        };
        let keep = self.mask.affine(-1.0, 1.0)?;
        *latents = (proper.broadcast_mul(&keep)? + latents.broadcast_mul(&self.mask)?)?;
        Ok(())
    }
}

/// [`Error::NonFinite`] unless every value of `t` is finite: one reduction, so cheap enough
/// for every step.
fn finite(t: &Tensor, at: impl FnOnce() -> String) -> Result<()> {
    if sd_weights::finite::all_finite(t)? {
        Ok(())
    } else {
        Err(Error::NonFinite { at: at() })
    }
}

impl StableDiffusion {
    /// Pixels per latent pixel (8 for real SD).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }

    /// The image size (width, height) the model was trained at, as diffusers picks it when
    /// none is given: the UNet's `sample_size` times the VAE's scale; 512x512 without one.
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.vae_scale_factor();
        match self.unet.config().sample_size {
            Some((h, w)) => (w * f, h * f),
            None => (512, 512),
        }
    }

    /// How this model's generation memory grows with the image (see
    /// `sd_plugins_api::memory`): per image pixel, the larger of the UNet's peak (at latent
    /// size, its batch doubled by classifier-free guidance, plus one more UNet's worth per
    /// ControlNet) and the VAE decoder's (at full size, the whole batch at once), in f32.
    pub fn memory_cost(&self, cfg: bool, controlnets: usize) -> sd_plugins_api::memory::Cost {
        let f = self.vae_scale_factor() as f64;
        let rows = if cfg { 2.0 } else { 1.0 };
        let unet = 4.0
            * rows
            * (1.0 + controlnets as f64)
            * self.unet.config().values_per_latent_pixel(false)
            / (f * f);
        let vae = 4.0 * self.vae.config().values_per_pixel();
        let peak = if unet > vae {
            format!(
                "the UNet's feature maps at {}x latent resolution{}",
                self.vae_scale_factor(),
                if cfg { ", twice for guidance" } else { "" }
            )
        } else {
            format!(
                "the VAE decoder's {}-channel maps at full size",
                self.vae
                    .config()
                    .block_out_channels
                    .iter()
                    .take(2)
                    .max()
                    .unwrap_or(&0)
            )
        };
        sd_plugins_api::memory::Cost {
            per_pixel: unet.max(vae),
            fixed: 0,
            peak,
        }
    }

    /// Refuse `width` x `height` x `batch` before anything is allocated if it would not fit
    /// in the memory available (`sd_plugins_api::memory`); the message says what would.
    pub fn check_memory(
        &self,
        width: usize,
        height: usize,
        batch: usize,
        cfg: bool,
        controlnets: usize,
    ) -> Result<()> {
        let cost = self.memory_cost(cfg, controlnets);
        sd_plugins_api::memory::check(
            "width x height",
            width,
            height,
            batch,
            self.vae_scale_factor(),
            &cost,
        )
        .map_err(Error::Invalid)
    }

    fn latent_shape(&self, req: &GenerateRequest) -> [usize; 4] {
        let f = self.vae_scale_factor();
        [
            req.batch,
            self.vae.config().latent_channels,
            req.height / f,
            req.width / f,
        ]
    }

    /// Check a request against this model; every message names the parameter and value.
    pub fn validate(&self, req: &GenerateRequest) -> Result<()> {
        let f = self.vae_scale_factor();
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % f != 0 {
                return Err(Error::Invalid(format!(
                    "{name} {v} is not a positive multiple of {f} (the VAE's downscale factor)"
                )));
            }
        }
        if req.steps == 0 {
            return Err(Error::Invalid("steps must be at least 1".into()));
        }
        if req.batch == 0 {
            return Err(Error::Invalid("batch must be at least 1".into()));
        }
        use sd_plugins_api::number::Range;
        Range::ANY
            .check(req.cfg_scale)
            .map_err(|m| Error::Invalid(format!("cfg_scale: {m}")))?;
        self.check_memory(req.width, req.height, req.batch, req.cfg_scale > 1.0, 0)?;
        let strength = req.effective_strength();
        let unit = Range {
            min_open: true,
            ..Range::closed(0.0, 1.0)
        };
        unit.check(strength)
            .map_err(|m| Error::Invalid(format!("strength: {m}")))?;
        if let Some(n) = req.run_steps {
            if n == 0 || n > req.steps {
                return Err(Error::Invalid(format!(
                    "run_steps {n} must be between 1 and steps ({})",
                    req.steps
                )));
            }
        }
        if req.has_init() && req.start_step() >= req.steps {
            return Err(Error::Invalid(format!(
                "strength {strength} with {} steps leaves no step to run (int(steps * strength) = 0)",
                req.steps
            )));
        }
        if req.mask.is_some() && req.init_image.is_none() {
            return Err(Error::Invalid("a mask needs an init image".into()));
        }
        match (self.is_depth_model(), &req.depth) {
            (true, None) => {
                return Err(Error::Invalid(format!(
                    "{} is a depth model (5-channel UNet): it needs a depth map",
                    self.root.display()
                )))
            }
            (true, Some(_)) if !req.has_init() => {
                return Err(Error::Invalid(
                    "a depth model makes depth2img: it needs an init image".into(),
                ))
            }
            (false, Some(_)) => {
                return Err(Error::Invalid(format!(
                    "a depth map needs a depth model (5-channel UNet); {} is a {} model",
                    self.root.display(),
                    self.family()
                )))
            }
            (_, Some(d)) if d.rank() != 4 || d.dim(0)? != 1 || d.dim(1)? != 1 => {
                return Err(Error::Invalid(format!(
                    "depth map has shape {:?}, expected [1, 1, h, w]",
                    d.dims()
                )))
            }
            _ => {}
        }
        if self.is_inpaint_model() && req.mask.is_none() {
            return Err(Error::Invalid(format!(
                "{} is an inpainting model (9-channel UNet): it needs an init image and a mask",
                self.root.display()
            )));
        }
        let check = |what: &str, t: &Tensor, want: &[usize]| -> Result<()> {
            if t.dims() != want {
                return Err(Error::Invalid(format!(
                    "{what} has shape {:?}, expected {want:?}",
                    t.dims()
                )));
            }
            Ok(())
        };
        if let Some(img) = &req.init_image {
            check("init image", img, &[1, 3, req.height, req.width])?;
        }
        if let Some(l) = &req.init_latents {
            let mut want = self.latent_shape(req);
            if l.dim(0)? == 1 {
                want[0] = 1;
            }
            check("init latents", l, &want)?;
            if req.mask.is_some() {
                return Err(Error::Invalid(
                    "init latents take no mask (inpainting starts from an init image)".into(),
                ));
            }
        }
        if let Some(m) = &req.mask {
            check("mask", m, &[1, 1, req.height, req.width])?;
        }
        if let Some(n) = &req.noise {
            check("noise tensor", n, &self.latent_shape(req))?;
        }
        Ok(())
    }

    /// Encode images `[B, 3, H, W]` in [-1, 1] to scaled latents (the distribution's mean).
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = image.dims4()?;
        let x = image
            .to_device(&self.aux_device)?
            .to_dtype(self.vae_dtype)?;
        let z = match self.vae_tiles(b, w, h) {
            Some(t) => self.vae.encode_mean_tiled(&x, t)?,
            None => self.vae.encode_mean(&x)?,
        };
        let z = self.vae.scale_latents(&z.to_dtype(DType::F32)?)?;
        Ok(z.to_device(&self.device)?)
    }

    /// Decode scaled latents to images in [0, 1].
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self
            .vae
            .unscale_latents(&latents.to_device(&self.aux_device)?)?
            .to_dtype(self.vae_dtype)?;
        let (b, _, h, w) = z.dims4()?;
        let f = self.vae_scale_factor();
        let img = match self.vae_tiles(b, w * f, h * f) {
            Some(t) => self.vae.decode_tiled(&z, t)?,
            None => self.vae.decode(&z)?,
        }
        .to_dtype(DType::F32)?;
        finite(&img, || "the images decoded by the VAE".into())?;
        Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// The text conditioning of a request: one encoder for SD 1.x/2.x, both (and the pooled
    /// vectors) for SDXL; `uncond` only with classifier-free guidance.
    fn encode_text(&self, req: &GenerateRequest, cfg: bool) -> Result<Conditioning> {
        let c = self.encode_text_on_aux(req, cfg)?;
        // from the text encoders' device and dtype to the UNet's ([`crate::Offload`])
        let place =
            |t: Tensor| -> Result<Tensor> { Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?) };
        Ok(Conditioning {
            cond: place(c.cond)?,
            uncond: c.uncond.map(place).transpose()?,
            pooled: c.pooled.map(place).transpose()?,
            uncond_pooled: c.uncond_pooled.map(place).transpose()?,
        })
    }

    fn encode_text_on_aux(&self, req: &GenerateRequest, cfg: bool) -> Result<Conditioning> {
        let dev = &self.aux_device;
        let negative = cfg.then_some(match req.negative_prompt.as_deref() {
            None if self.force_zeros_for_empty_prompt => None,
            n => Some(n.unwrap_or("")),
        });
        if !self.is_sdxl() {
            let (cond, uncond) = encode_prompts_with(
                &self.tokenizer,
                &self.text_encoder,
                &req.prompt,
                cfg.then_some(req.negative_prompt.as_deref().unwrap_or("")),
                req.clip_skip,
                &self.embeddings,
                dev,
            )?;
            return Ok(Conditioning {
                cond,
                uncond,
                pooled: None,
                uncond_pooled: None,
            });
        }
        // SDXL: CLIP-L and bigG; the refiner: bigG alone
        let mut encoders = vec![(&self.tokenizer, &self.text_encoder)];
        encoders.extend(self.text_encoder_2.as_ref().map(|(te, tok)| (tok, te)));
        let d = encode_prompts_dual_with(
            &encoders,
            &req.prompt,
            negative,
            req.clip_skip,
            &self.embeddings,
            dev,
        )?;
        let (uncond, uncond_pooled) = d.uncond.unzip();
        Ok(Conditioning {
            cond: d.cond,
            uncond,
            pooled: Some(d.pooled),
            uncond_pooled,
        })
    }

    /// SDXL's added conditioning for every UNet row (negative rows first, as the context),
    /// `None` for models without the `text_time` embedding.
    fn added_conditioning(
        &self,
        req: &GenerateRequest,
        c: &Conditioning,
    ) -> Result<Option<AddedCond>> {
        if !self.is_sdxl() {
            return Ok(None);
        }
        let missing = || {
            Error::Invalid(
                "an SDXL model needs the pooled text vectors (a hook dropped them?)".into(),
            )
        };
        let pooled = c.pooled.as_ref().ok_or_else(missing)?;
        let (w, h, m) = (req.width, req.height, &req.micro);
        let ids = |negative: bool| -> Result<Tensor> {
            let t = if self.requires_aesthetics_score {
                Tensor::new(&m.aesthetic_time_ids(w, h, negative), &self.device)?
            } else {
                Tensor::new(&m.time_ids(w, h), &self.device)?
            };
            Ok(t.unsqueeze(0)?.repeat((req.batch, 1))?)
        };
        let mut rows = vec![pooled; req.batch];
        let mut time_ids = ids(false)?;
        if c.uncond.is_some() {
            let u = c.uncond_pooled.as_ref().ok_or_else(missing)?;
            rows = [vec![u; req.batch], rows].concat();
            time_ids = Tensor::cat(&[&ids(true)?, &time_ids], 0)?;
        }
        let text_embeds = Tensor::cat(&rows, 0)?.to_dtype(self.dtype)?;
        Ok(Some(AddedCond {
            text_embeds,
            time_ids,
        }))
    }

    /// Run the denoising loop and return the final latents (what diffusers returns with
    /// `output_type="latent"`).
    pub fn denoise(
        &self,
        req: &GenerateRequest,
        hooks: &mut HookSet,
        rng: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        self.denoise_refined(req, None, hooks, rng)
    }

    /// The UNet batch's text context (negative rows first) and SDXL's added conditioning,
    /// after the `on_conditioning` hooks.
    fn unet_conditioning(
        &self,
        req: &GenerateRequest,
        cfg: bool,
        hooks: &mut HookSet,
    ) -> Result<(Tensor, Option<AddedCond>)> {
        let mut conditioning = self.encode_text(req, cfg)?;
        hooks.on_conditioning(&mut conditioning)?;
        finite(&conditioning.cond, || {
            "the prompt's conditioning (the text encoder's output)".into()
        })?;
        if let Some(u) = &conditioning.uncond {
            finite(u, || {
                "the negative prompt's conditioning (the text encoder's output)".into()
            })?;
        }
        let repeat = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&vec![t; req.batch], 0)?) };
        let cond = repeat(&conditioning.cond)?;
        let context = match &conditioning.uncond {
            Some(u) => Tensor::cat(&[&repeat(u)?, &cond], 0)?,
            None => cond,
        };
        let context = context.to_dtype(self.dtype)?;
        let added = self.added_conditioning(req, &conditioning)?;
        Ok((context, added))
    }

    /// [`Self::denoise`] handing the steps whose timestep is below `(1 - switch) x
    /// num_train_timesteps` to `refiner` (A1111's "Refiner ... Switch at" by timestep, which
    /// is diffusers' `denoising_end` / `denoising_start` cut): its own UNet and text
    /// conditioning continue the same sampler. Residual providers (ControlNets) guide the
    /// base's steps only.
    pub fn denoise_refined(
        &self,
        req: &GenerateRequest,
        refiner: Option<(&StableDiffusion, f64)>,
        hooks: &mut HookSet,
        rng: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        self.validate(req)?;
        let dev = &self.device;
        let cfg = req.cfg_scale > 1.0; // diffusers: do_classifier_free_guidance
        let (mut context, mut added) = self.unet_conditioning(req, cfg, hooks)?;
        let mut unet = &self.unet;
        let mut dtype = self.dtype;
        let mut refine = match refiner {
            Some((r, switch)) => {
                if !(0.0..=1.0).contains(&switch) {
                    return Err(Error::Invalid(format!(
                        "refiner switch {switch}: use a fraction in 0..=1"
                    )));
                }
                self.check_refiner(r)?;
                let cutoff =
                    ((1.0 - switch) * self.scheduler_config.num_train_timesteps as f64).round();
                let (c, a) = r.unet_conditioning(req, cfg, hooks)?;
                Some((r, cutoff, c, a))
            }
            None => None,
        };
        let repeat = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&vec![t; req.batch], 0)?) };

        let mut sampler =
            build_sampler(req.sampler, req.schedule, &self.scheduler_config, req.steps)?;
        let total = sampler.timesteps().len();
        let shape = self.latent_shape(req);
        let noise = match &req.noise {
            Some(n) => n.to_dtype(DType::F32)?.to_device(dev)?,
            None => rng.randn(&shape, dev)?,
        };

        let strength = req.effective_strength();
        // diffusers' `t_start * scheduler.order` (2 for Heun and DPM++ SDE)
        let first = req.start_step() * sampler.order();
        // Source latents, for img2img, inpaint blending and strength < 1 inpainting.
        let mut image_latents = match (&req.init_latents, &req.init_image) {
            (Some(l), _) if l.dim(0)? == req.batch => Some(l.to_dtype(DType::F32)?.to_device(dev)?),
            (Some(l), _) => Some(repeat(&l.to_dtype(DType::F32)?.to_device(dev)?)?),
            (None, Some(img)) => Some(repeat(&self.encode_image(img)?)?),
            (None, None) => None,
        };
        // A1111's latent fills: the masked part of the init latents replaced before the
        // noise is added (`processing.py`, inpainting_fill 2 and 3)
        if let (Some(src), Some(mask), fill) = (&image_latents, &req.mask, req.latent_fill) {
            if fill != LatentFill::Original {
                let m = repeat(&mask.upsample_nearest2d(shape[2], shape[3])?)?;
                let keep = src.broadcast_mul(&m.affine(-1.0, 1.0)?)?;
                image_latents = Some(match fill {
                    LatentFill::Noise => (keep + noise.broadcast_mul(&m)?)?,
                    _ => keep,
                });
            }
        }
        let mut latents = match (&image_latents, req.mask.is_some() && strength >= 1.0) {
            (Some(src), false) => sampler.add_noise(src, &noise, first)?,
            _ => (&noise * sampler.init_noise_sigma())?,
        };

        // Inpainting: latent-size mask, masked-image latents for 9-channel UNets, and mask
        // blending (a hook of the loop's own) for 4-channel ones.
        let mut extra_channels: Option<Tensor> = None;
        let mut own_hooks: Vec<Box<dyn Hook>> = Vec::new();
        if let (Some(mask), Some(img)) = (&req.mask, &req.init_image) {
            let (h, w) = (shape[2], shape[3]);
            let mask_lat = repeat(&mask.upsample_nearest2d(h, w)?)?;
            if self.is_inpaint_model() {
                let keep = mask.affine(-1.0, 1.0)?; // diffusers: image * (mask < 0.5)
                let masked = img.broadcast_mul(&keep)?;
                let masked_latents = repeat(&self.encode_image(&masked)?)?;
                let extra = Tensor::cat(&[&mask_lat, &masked_latents], 1)?;
                extra_channels = Some(if cfg {
                    Tensor::cat(&[&extra, &extra], 0)?
                } else {
                    extra
                });
            } else {
                own_hooks.push(Box::new(InpaintBlend {
                    image_latents: image_latents.clone().expect("init image encoded"),
                    noise: noise.clone(),
                    mask: mask_lat,
                }));
            }
        }
        // depth2img: the depth map at the latents' size in [-1, 1] (diffusers' prepare_depth_map)
        if let (true, Some(d)) = (self.is_depth_model(), &req.depth) {
            let d = crate::generation::latent_resize::resize_latents(
                &d.to_dtype(DType::F32)?,
                shape[2],
                shape[3],
                crate::generation::latent_resize::LatentUpscale::Bicubic,
            )?
            .to_device(dev)?;
            let (lo, hi) = (d.min_all()?, d.max_all()?);
            let d = ((d.broadcast_sub(&lo)? * 2.0)?.broadcast_div(&(hi - &lo)?)? - 1.0)?;
            let d = repeat(&d)?;
            extra_channels = Some(if cfg { Tensor::cat(&[&d, &d], 0)? } else { d });
        }
        // Called first at every hook point of the steps; gone again when this returns.
        let mut hooks = hooks.with_leading(own_hooks);

        for index in first..total {
            let t = sampler.timesteps()[index];
            let step = StepInfo {
                index,
                first_index: first,
                total,
                timestep: t,
                batch: req.batch,
                cfg,
            };
            match hooks.before_step(&step, &mut latents) {
                Err(sd_plugins_api::HookError::Stop { .. }) => break,
                r => r?,
            }
            let doubled = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let scaled = sampler.scale_model_input(&doubled, index)?;
            let model_input = match &extra_channels {
                Some(e) => Tensor::cat(&[&scaled, e], 1)?,
                None => scaled.clone(),
            };
            if refine.as_ref().is_some_and(|r| t < r.1) {
                let (r, _, c, a) = refine.take().expect("checked");
                tracing::debug!(step = index, timestep = t, "switching to the refiner");
                (unet, dtype, context, added) = (&r.unet, r.dtype, c, a);
            }
            let refining = !std::ptr::eq(unet, &self.unet);
            let model_input = model_input.to_dtype(dtype)?;
            let scaled_in = scaled.to_dtype(dtype)?;
            let input = ResidualInput {
                sample: &model_input,
                latents: &scaled_in,
                encoder_hidden_states: &context,
                added: added.as_ref(),
            };
            let (residuals, additions) = if refining {
                (None, None)
            } else {
                (
                    hooks.residuals(&step, &input)?,
                    hooks.additions(&step, &input)?,
                )
            };
            let n = model_input.dim(0)?;
            let ts = Tensor::full(t as f32, n, &self.device)?;
            let out = unet
                .forward_full(
                    &model_input,
                    &ts,
                    &context,
                    added.as_ref(),
                    residuals.as_ref(),
                    additions.as_ref(),
                )?
                .to_dtype(DType::F32)?;
            let (uncond_pred, cond_pred) = if cfg {
                (
                    Some(out.narrow(0, 0, req.batch)?),
                    out.narrow(0, req.batch, req.batch)?,
                )
            } else {
                (None, out)
            };
            let guided = hooks.noise_pred(
                &step,
                &NoisePrediction {
                    uncond: uncond_pred.as_ref(),
                    cond: &cond_pred,
                    guidance_scale: req.cfg_scale,
                },
            )?;
            latents = sampler.step(&guided, index, &latents, rng)?;
            hooks.after_step(&step, &Levels(sampler.as_ref()), &mut latents)?;
            // a cheap check per step: the step where NaN or infinity first appears is named
            finite(&latents, || {
                format!("the latents after step {} of {total}", index + 1)
            })?;
        }
        Ok(latents)
    }

    /// A refiner must be an SDXL-class model with this model's latents, on the same device,
    /// and 4-channel unless this one takes inpainting channels too.
    fn check_refiner(&self, r: &StableDiffusion) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("refiner {}: {m}", r.root.display())));
        if !r.is_sdxl() {
            return bad(format!("a {} model is no SDXL refiner", r.family()));
        }
        let (a, b) = (
            self.vae.config().latent_channels,
            r.vae.config().latent_channels,
        );
        if a != b || self.vae_scale_factor() != r.vae_scale_factor() {
            return bad("its latents differ from the base model's".into());
        }
        if r.unet.config().in_channels != self.unet.config().in_channels {
            return bad(format!(
                "its UNet takes {} channels, the base's {}",
                r.unet.config().in_channels,
                self.unet.config().in_channels
            ));
        }
        if !self.device.same_device(&r.device) {
            return bad("it is on another device".into());
        }
        Ok(())
    }

    /// Denoise, decode, and run the `on_image` hooks.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        hooks: &mut HookSet,
        rng: &mut dyn NoiseSource,
    ) -> Result<GenerateOutput> {
        let latents = self.denoise(req, hooks, rng)?;
        let mut images = self.decode_latents(&latents)?;
        hooks.on_image(&mut images)?;
        Ok(GenerateOutput { latents, images })
    }
}
