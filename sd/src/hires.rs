//! AUTOMATIC1111's "Hires. fix" (`processing.py`, `StableDiffusionProcessingTxt2Img`): a
//! txt2img first pass, its result upscaled (in latent space, or decoded, upscaled as an image
//! and encoded again), then a second img2img pass at the larger size that runs `steps` steps
//! of a schedule `steps / denoise` long, from noise drawn again from the seed.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};
use image::{imageops, DynamicImage, RgbImage};
use sd_pipeline::generation::image_io::{image_tensor, to_rgb8};
use sd_pipeline::generation::latent_resize::{resize_latents, LatentUpscale};
use sd_pipeline::samplers::{SamplerKind, Schedule};
use sd_pipeline::{GenerateRequest, StableDiffusion};

use crate::error::Result;

/// How the first pass's result is enlarged.
#[derive(Debug, Clone, PartialEq)]
pub enum HiresUpscaler {
    /// In latent space (A1111's "Latent ..." upscalers).
    Latent(LatentUpscale),
    /// Decoded, resized as an image with Lanczos (A1111's "Lanczos", and "None"), encoded.
    Lanczos,
    /// Decoded, resized with nearest neighbour (A1111's "Nearest"), encoded.
    Nearest,
    /// Decoded, enlarged by an ESRGAN / Real-ESRGAN model (its name in `upscaler_dir`, one of
    /// A1111's Real-ESRGAN names, or a path), resized to the size, encoded.
    Model(String),
}

impl HiresUpscaler {
    /// A1111's name, for its infotext.
    pub fn a1111_name(&self) -> String {
        match self {
            Self::Latent(m) => m.a1111_name().into(),
            Self::Lanczos => "Lanczos".into(),
            Self::Nearest => "Nearest".into(),
            Self::Model(m) => m.clone(),
        }
    }
}

impl fmt::Display for HiresUpscaler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latent(m) => f.write_str(m.name()),
            Self::Lanczos => f.write_str("lanczos"),
            Self::Nearest => f.write_str("nearest"),
            Self::Model(m) => f.write_str(m),
        }
    }
}

impl FromStr for HiresUpscaler {
    type Err = String;
    /// sdctl's names (`latent`, `latent-bicubic`, ..., `lanczos`, `nearest`) or A1111's
    /// (`Latent (bicubic antialiased)`, `Lanczos`, `None`), any case; anything else names an
    /// upscaler model (found when the job runs).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_lowercase().as_str() {
            "" => Err(format!(
                "an empty hires upscaler: use {}, lanczos, nearest or an upscaler model",
                LatentUpscale::ALL.map(|m| m.name()).join(", ")
            )),
            "lanczos" | "none" => Ok(Self::Lanczos),
            "nearest" => Ok(Self::Nearest),
            t if t.starts_with("latent") => s.parse::<LatentUpscale>().map(Self::Latent),
            _ => Ok(Self::Model(s.trim().to_string())),
        }
    }
}

/// Which passes a ControlNet unit acts on (sd-webui-controlnet's `hr_option`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HrOption {
    #[default]
    Both,
    LowResOnly,
    HighResOnly,
}

impl HrOption {
    pub const NAMES: [&'static str; 3] = ["both", "low", "high"];

    pub fn name(self) -> &'static str {
        match self {
            Self::Both => "both",
            Self::LowResOnly => "low",
            Self::HighResOnly => "high",
        }
    }

    /// The extension's labels.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Both => "Both",
            Self::LowResOnly => "Low res only",
            Self::HighResOnly => "High res only",
        }
    }

    pub fn first_pass(self) -> bool {
        self != Self::HighResOnly
    }

    pub fn second_pass(self) -> bool {
        self != Self::LowResOnly
    }
}

impl FromStr for HrOption {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_lowercase().as_str() {
            "both" => Ok(Self::Both),
            "low" | "low res only" => Ok(Self::LowResOnly),
            "high" | "high res only" => Ok(Self::HighResOnly),
            _ => Err(format!("{s:?}: use both, low or high")),
        }
    }
}

/// The hires fix's settings (A1111's defaults: scale 2, "Latent", the first pass's steps,
/// denoising 0.7).
#[derive(Debug, Clone, PartialEq)]
pub struct Hires {
    pub scale: f64,
    /// `hr_resize_x` / `hr_resize_y` (0 = from the other side): replaces `scale`.
    pub resize: Option<(usize, usize)>,
    pub upscaler: HiresUpscaler,
    /// Second-pass steps; 0 = the first pass's.
    pub steps: usize,
    pub denoise: f64,
    /// The second pass's prompt and negative prompt (`None`: the first pass's).
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub sampler: Option<SamplerKind>,
    pub schedule: Option<Schedule>,
}

impl Default for Hires {
    fn default() -> Self {
        Self {
            scale: 2.0,
            resize: None,
            upscaler: HiresUpscaler::Latent(LatentUpscale::Bilinear),
            steps: 0,
            denoise: 0.7,
            prompt: None,
            negative_prompt: None,
            sampler: None,
            schedule: None,
        }
    }
}

/// Where the second pass renders: the upscaled size, and the latent crop A1111 applies when a
/// resize of another aspect ratio is asked for (`truncate_x`, `truncate_y`, in latent pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiresTarget {
    pub upscale_to: (usize, usize),
    pub truncate: (usize, usize),
    /// The final size: `upscale_to` less the crop, in whole latent pixels.
    pub size: (usize, usize),
}

impl Hires {
    /// Check values that need no model.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.scale.is_finite() && (1.0..=8.0).contains(&self.scale)) {
            return Err(format!("hires_scale {}: use 1..=8", self.scale));
        }
        if !(self.denoise > 0.0 && self.denoise <= 1.0) {
            return Err(format!(
                "hires_denoise {}: use a value in (0, 1]",
                self.denoise
            ));
        }
        if self.steps > 1000 {
            return Err(format!("hires_steps {}: at most 1000", self.steps));
        }
        if let Some((w, h)) = self.resize {
            if (w == 0 && h == 0) || w > 16384 || h > 16384 {
                return Err(format!(
                    "hires_size {w}x{h}: give a side up to 16384 (0 = from the other)"
                ));
            }
        }
        Ok(())
    }

    /// A1111's `hr_upscale_to_x/y` and truncation for a `width` x `height` first pass with
    /// latents `f` times smaller (processing.py `StableDiffusionProcessingTxt2Img.init`).
    pub fn target(&self, width: usize, height: usize, f: usize) -> HiresTarget {
        let (to, truncate) = match self.resize {
            None => (
                (
                    (width as f64 * self.scale) as usize,
                    (height as f64 * self.scale) as usize,
                ),
                (0, 0),
            ),
            Some((rx, 0)) => ((rx, rx * height / width), (0, 0)),
            Some((0, ry)) => ((ry * width / height, ry), (0, 0)),
            Some((rx, ry)) => {
                let src = width as f64 / height as f64;
                let dst = rx as f64 / ry as f64;
                let to = if src < dst {
                    (rx, rx * height / width)
                } else {
                    (ry * width / height, ry)
                };
                (to, ((to.0 - rx) / f, (to.1 - ry) / f))
            }
        };
        let (lw, lh) = (to.0 / f, to.1 / f);
        HiresTarget {
            upscale_to: to,
            truncate,
            size: ((lw - truncate.0) * f, (lh - truncate.1) * f),
        }
    }

    /// The second pass's schedule: `(steps, run)`: A1111 runs the last `run` steps of a
    /// `steps`-step schedule (`setup_img2img_steps` with fixed steps: `int(run / min(denoise,
    /// 0.999))`).
    pub fn schedule(&self, first_pass_steps: usize) -> (usize, usize) {
        let run = if self.steps == 0 {
            first_pass_steps
        } else {
            self.steps
        };
        let total = (run as f64 / self.denoise.min(0.999)) as usize;
        (total.max(run), run)
    }
}

/// The second pass, planned before the first runs.
pub struct Plan {
    /// The second pass's request (its `init_latents` are set by [`upscale`]).
    pub req: GenerateRequest,
    pub target: HiresTarget,
    pub upscaler: HiresUpscaler,
}

/// Plan the second pass of `first` (the first pass's request) and check it as a request;
/// `refiner`: the job names an SDXL refiner.
pub fn plan(
    h: &Hires,
    refiner: bool,
    first: &GenerateRequest,
    sd: &StableDiffusion,
) -> Result<Plan> {
    h.validate()?;
    if first.has_init() {
        return Err(
            "the hires fix is for txt2img (as A1111's): drop init_image or the hires \
                    settings"
                .into(),
        );
    }
    if refiner {
        return Err("the hires fix and a refiner together are not supported".into());
    }
    for (key, p) in [
        ("hires_prompt", &h.prompt),
        ("hires_negative_prompt", &h.negative_prompt),
    ] {
        if p.as_deref().is_some_and(|p| p.contains("<lora:")) {
            return Err(format!(
                "{key}: <lora:...> tags belong in the prompt (the LoRAs apply to both passes)"
            )
            .into());
        }
    }
    let f = sd.vae_scale_factor();
    let target = h.target(first.width, first.height, f);
    let (width, height) = target.size;
    if width == 0 || height == 0 {
        return Err(format!(
            "the hires size {}x{} has no latent pixel left",
            target.upscale_to.0, target.upscale_to.1
        )
        .into());
    }
    let (steps, run) = h.schedule(first.steps);
    let mut req = first.clone();
    (req.width, req.height, req.steps) = (width, height, steps);
    req.run_steps = Some(run);
    req.strength = Some(h.denoise);
    // a noise file replaces the first pass's draw; the second draws from the seed
    req.noise = None;
    if let Some(p) = &h.prompt {
        req.prompt = p.clone();
    }
    if let Some(n) = &h.negative_prompt {
        req.negative_prompt = Some(n.clone());
    }
    req.sampler = h.sampler.unwrap_or(first.sampler);
    req.schedule = h.schedule.unwrap_or(first.schedule);
    // checked with stand-in latents of the right shape
    let c = sd.vae.config().latent_channels;
    req.init_latents = Some(Tensor::zeros(
        (1, c, height / f, width / f),
        DType::F32,
        &sd.device,
    )?);
    sd.validate(&req)
        .map_err(|e| format!("hires pass ({width}x{height}, {steps} steps): {e}"))?;
    Ok(Plan {
        req,
        target,
        upscaler: h.upscaler.clone(),
    })
}

/// The first pass's latents enlarged to the second pass's size: resized as latents, or
/// decoded, resized as images and encoded; then A1111's crop for a resize of another aspect
/// ratio (`samples[:, :, ty // 2 : H - (ty + 1) // 2, tx // 2 : W - (tx + 1) // 2]`).
pub fn upscale(
    sd: &StableDiffusion,
    plan: &Plan,
    latents: &Tensor,
    upscaler_dir: Option<&std::path::Path>,
) -> Result<Tensor> {
    let f = sd.vae_scale_factor();
    let (tw, th) = plan.target.upscale_to;
    let (lw, lh) = (tw / f, th / f);
    let up = match &plan.upscaler {
        HiresUpscaler::Latent(mode) => resize_latents(latents, lh, lw, *mode)?,
        other => {
            let filter = match other {
                HiresUpscaler::Nearest => imageops::FilterType::Nearest,
                // PIL's Lanczos in A1111; this Lanczos3 is close, not bit-identical
                _ => imageops::FilterType::Lanczos3,
            };
            let model = match other {
                HiresUpscaler::Model(name) => {
                    let path = crate::upscaler::resolve(name, upscaler_dir)
                        .map_err(|e| format!("hires_upscaler {e}"))?;
                    Some(
                        sd_pipeline::model::esrgan::Upscaler::load(&path)
                            .map_err(|e| format!("hires_upscaler: {e}"))?,
                    )
                }
                _ => None,
            };
            let images = sd.decode_latents(latents)?;
            let mut out = Vec::new();
            for b in 0..images.dim(0)? {
                let (w, h, data) = to_rgb8(&images.get(b)?)?;
                let img = RgbImage::from_raw(w as u32, h as u32, data)
                    .ok_or("decoded image of the wrong size")?;
                // A1111's resize_image with an upscaler: the model's scale, then to the size
                let img = match &model {
                    Some(m) => m
                        .upscale_image(
                            &DynamicImage::ImageRgb8(img),
                            Default::default(),
                            &mut |_, _| {},
                        )
                        .map_err(|e| format!("hires_upscaler: {e}"))?
                        .to_rgb8(),
                    None => img,
                };
                let img = imageops::resize(&img, (lw * f) as u32, (lh * f) as u32, filter);
                let t = image_tensor(DynamicImage::ImageRgb8(img), lw * f, lh * f, &sd.device)?;
                out.push(sd.encode_image(&t)?);
            }
            Tensor::cat(&out, 0)?
        }
    };
    let (tx, ty) = plan.target.truncate;
    Ok(up.narrow(2, ty / 2, lh - ty)?.narrow(3, tx / 2, lw - tx)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_a1111() {
        let h = Hires::default();
        assert_eq!(h.target(512, 768, 8).size, (1024, 1536));
        let h = Hires {
            scale: 1.5,
            ..Hires::default()
        };
        assert_eq!(h.target(64, 64, 8).size, (96, 96));
        // resize to another aspect ratio: fit the wider side, crop the latent overhang
        let h = Hires {
            resize: Some((1024, 768)),
            ..Hires::default()
        };
        let t = h.target(512, 512, 8);
        assert_eq!(t.upscale_to, (1024, 1024));
        assert_eq!(t.truncate, (0, 32));
        assert_eq!(t.size, (1024, 768));
        let h = Hires {
            resize: Some((0, 600)),
            ..Hires::default()
        };
        assert_eq!(h.target(512, 768, 8).upscale_to, (400, 600));
        // 20 steps at 0.7: the last 20 of int(20 / 0.7) = 28
        assert_eq!(Hires::default().schedule(20), (28, 20));
        let h = Hires {
            steps: 10,
            denoise: 1.0,
            ..Hires::default()
        };
        assert_eq!(h.schedule(20), (10, 10));
        assert!("Latent (bicubic)".parse::<HiresUpscaler>().is_ok());
        assert_eq!(
            "None".parse::<HiresUpscaler>().unwrap(),
            HiresUpscaler::Lanczos
        );
        // any other name is an upscaler model, found when the job runs
        assert_eq!(
            "R-ESRGAN 4x+".parse::<HiresUpscaler>().unwrap(),
            HiresUpscaler::Model("R-ESRGAN 4x+".into())
        );
        assert!("Latent (lanczos)".parse::<HiresUpscaler>().is_err());
        assert!("".parse::<HiresUpscaler>().is_err());
    }
}
