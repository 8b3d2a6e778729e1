//! [`Job`]: the settings a user gives for one generation, with the defaults `sdctl generate`
//! uses, whatever door it comes through (the CLI, a config file, the server, a Rust program).

use std::path::PathBuf;
use std::sync::Arc;

use sd_controlnet::UnitSpec;
use sd_lora::LoraSpec;
use sd_pipeline::samplers::{SamplerKind, Schedule};
use sd_plugins_api::dylib::host::PluginLibrary;
use sd_plugins_api::Params;

/// Where the initial (and ancestral) noise comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rng {
    /// `torch.randn` on the CPU (diffusers' default generator; A1111's "CPU").
    #[default]
    TorchCpu,
    /// Philox 4x32-10 as CUDA's `torch.randn` draws it (A1111's "GPU" / "NV").
    Philox,
}

impl Rng {
    pub fn name(self) -> &'static str {
        match self {
            Rng::TorchCpu => "torch-cpu",
            Rng::Philox => "philox",
        }
    }
}

impl std::str::FromStr for Rng {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "torch-cpu" => Ok(Rng::TorchCpu),
            "philox" => Ok(Rng::Philox),
            other => Err(format!("{other:?} is not one of torch-cpu, philox")),
        }
    }
}

/// A control unit, with the id config files use to replace it in a later layer.
#[derive(Debug, Clone)]
pub struct Control {
    pub id: Option<String>,
    pub spec: UnitSpec,
    /// The passes of a hires fix the unit acts on (sd-webui-controlnet's `hr_option`).
    pub hr: crate::hires::HrOption,
}

impl From<UnitSpec> for Control {
    fn from(spec: UnitSpec) -> Self {
        Self {
            id: None,
            spec,
            hr: Default::default(),
        }
    }
}

/// A hook plugin to run, with its checked parameters.
#[derive(Clone)]
pub struct Plugin {
    pub lib: Arc<PluginLibrary>,
    pub params: Params,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plugin({}, {:?})", self.lib.manifest.name, self.params)
    }
}

/// One generation: txt2img by default, img2img with `init_image`, inpainting with `init_image`
/// and `mask`; control units, LoRAs and plugins as lists.
#[derive(Debug, Clone)]
pub struct Job {
    /// A diffusers folder, a single-file checkpoint or a Hugging Face cache folder; `None`
    /// is the embedded tiny-fill model (in builds with the `embedded-model` feature).
    pub model: Option<PathBuf>,
    /// A VAE file replacing the model's.
    pub vae: Option<PathBuf>,
    /// An SDXL refiner (a diffusers folder) taking over the last steps.
    pub refiner: Option<PathBuf>,
    /// The fraction of the schedule after which the refiner takes over (A1111's "Switch
    /// at", by timestep; default 0.8).
    pub refiner_switch: f64,
    /// The prompt; `<lora:NAME:WEIGHT>` tags in it are taken out and loaded from `lora_dir`.
    pub prompt: String,
    /// `None`: no negative prompt (SDXL base models then use zeros; see
    /// `GenerateRequest::negative_prompt`).
    pub negative_prompt: Option<String>,
    /// SDXL's size and crop conditioning (`original_size`, `target_size`, `crop_top_left`).
    pub micro: sd_pipeline::MicroConditioning,
    /// `None`: the init image's size, else the size the model was trained at.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: SamplerKind,
    pub schedule: Schedule,
    /// `None`: a seed is drawn (and reported in the result).
    pub seed: Option<u64>,
    pub rng: Rng,
    pub batch: usize,
    /// A1111 numbering: 1 is the last layer.
    pub clip_skip: usize,
    pub init_image: Option<PathBuf>,
    /// img2img / inpaint strength; `None`: 0.8 for img2img, 1.0 with a mask.
    pub strength: Option<f64>,
    pub mask: Option<PathBuf>,
    /// A1111's image steps around inpainting (mask blur, invert, only masked, overlay); none
    /// by default.
    pub inpaint: crate::inpaint::Inpaint,
    /// A safetensors file whose `noise` tensor replaces every initial-noise draw.
    pub noise: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// The text encoders and the VAE on the CPU in f32 (`--lowvram`,
    /// [`sd_pipeline::Offload::Cpu`]): a GPU holds only the UNet and the ControlNets.
    pub lowvram: bool,
    /// Where `<lora:NAME:...>` prompt tags are looked up.
    pub lora_dir: Option<PathBuf>,
    /// Textual-inversion embeddings the prompts may name (A1111's `--embeddings-dir`).
    pub embeddings_dir: Option<PathBuf>,
    /// Refuse LoRAs with modules that match nothing in the model.
    pub strict_lora: bool,
    /// Allow prompt-tag LoRA weights outside [`sd_lora::WEIGHT_RANGE`] (still finite).
    pub allow_extreme_weights: bool,
    pub control: Vec<Control>,
    pub lora: Vec<LoraSpec>,
    pub plugins: Vec<Plugin>,
    /// A1111's hires fix: a second pass at a larger size.
    pub hires: Option<crate::hires::Hires>,
    /// When the VAE works in tiles (diffusers' `enable_tiling`; `Auto` above a memory budget).
    pub vae_tiling: sd_pipeline::VaeTiling,
    /// depth2img with a depth model: a depth map (any grayscale PNG, 8 or 16 bit; larger =
    /// nearer), or a preprocessor that estimates one from the init image.
    pub depth_map: Option<PathBuf>,
    pub depth_estimator: Option<String>,
    /// Where the hires fix finds upscaler models by name.
    pub upscaler_dir: Option<PathBuf>,
    /// Outpainting: pad the init image and repaint the new border.
    pub outpaint: Option<crate::outpaint::Outpaint>,
    /// Write a live preview of the latents here after every step.
    pub preview_path: Option<PathBuf>,
    /// A TAESD / TAESDXL decoder for the previews; `None`: A1111's "Approx cheap".
    pub taesd: Option<PathBuf>,
}

impl Default for Job {
    /// `sdctl generate`'s defaults: 20 steps of DPM++ 2M Karras at CFG 7.5, torch's CPU
    /// generator, f32 on the CPU.
    fn default() -> Self {
        Self {
            model: None,
            vae: None,
            refiner: None,
            refiner_switch: 0.8,
            prompt: String::new(),
            negative_prompt: None,
            micro: Default::default(),
            width: None,
            height: None,
            steps: 20,
            cfg_scale: 7.5,
            sampler: SamplerKind::DpmPP2M,
            schedule: Schedule::Karras,
            seed: None,
            rng: Rng::TorchCpu,
            batch: 1,
            clip_skip: 1,
            init_image: None,
            strength: None,
            mask: None,
            inpaint: Default::default(),
            noise: None,
            device: "cpu".into(),
            dtype: "f32".into(),
            lowvram: false,
            lora_dir: None,
            embeddings_dir: None,
            strict_lora: false,
            allow_extreme_weights: false,
            control: Vec::new(),
            lora: Vec::new(),
            plugins: Vec::new(),
            hires: None,
            preview_path: None,
            taesd: None,
            outpaint: None,
            upscaler_dir: None,
            depth_map: None,
            depth_estimator: None,
            vae_tiling: Default::default(),
        }
    }
}

impl Job {
    /// A txt2img job with the default settings.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            ..Self::default()
        }
    }

    /// Every input file the job names is there and is what it should be, before anything is
    /// opened: images, noise and LoRA files regular files, models a file or a folder. A FIFO
    /// would block the first read forever, a device never end; a folder or a symlink loop is
    /// named as such. Errors name the flag and the path. A model that is not there at all may
    /// still be a Hugging Face id (see `model_path`), so only what exists is checked.
    pub fn check_inputs(&self) -> Result<(), String> {
        use sd_plugins_api::input_file::{check, check_file_or_folder};
        fn flag(f: &'static str) -> impl Fn(String) -> String {
            move |e| format!("{f} {e}")
        }
        let model = |f: &'static str, p: &std::path::Path| {
            if p.symlink_metadata().is_ok() {
                check_file_or_folder(p).map(drop).map_err(flag(f))
            } else {
                Ok(())
            }
        };
        if let Some(m) = &self.model {
            model("--model", m)?;
        }
        if let Some(v) = &self.vae {
            model("--vae", v)?;
        }
        for (f, p) in [
            ("--init-image", &self.init_image),
            ("--mask", &self.mask),
            ("--noise", &self.noise),
        ] {
            if let Some(p) = p {
                check(p).map_err(flag(f))?;
            }
        }
        for l in &self.lora {
            check(&l.path).map_err(flag("--lora"))?;
        }
        for c in &self.control {
            model("--control model", &c.spec.model)?;
            check(&c.spec.image).map_err(flag("--control image"))?;
            if let Some(m) = &c.spec.mask {
                check(m).map_err(flag("--control mask"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library's two doors, `Job` and the engine's `GenerateRequest`, start from the same
    /// settings.
    #[test]
    fn job_and_request_defaults_agree() {
        let (j, r) = (Job::new("p"), sd_pipeline::GenerateRequest::new("p"));
        assert_eq!(
            (
                j.steps,
                j.cfg_scale,
                j.sampler,
                j.schedule,
                j.batch,
                j.clip_skip
            ),
            (
                r.steps,
                r.cfg_scale,
                r.sampler,
                r.schedule,
                r.batch,
                r.clip_skip
            )
        );
        assert_eq!(
            (j.sampler, j.schedule),
            (SamplerKind::DpmPP2M, Schedule::Karras)
        );
    }
}
