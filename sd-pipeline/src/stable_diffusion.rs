//! [`StableDiffusion`]: the networks, tokenizer and scheduler config of one loaded model. It
//! is built by [`crate::loading`] (`StableDiffusion::load`) and run by [`crate::generation`].

use std::path::PathBuf;

use candle_core::{DType, Device};

use crate::model::clip::ClipTextModel;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::samplers::SchedulerConfig;
use crate::text::tokenizer::ClipTokenizer;

/// A loaded Stable Diffusion model.
pub struct StableDiffusion {
    pub root: PathBuf,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_encoder: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    /// SDXL's second text encoder and its tokenizer (pads with `!`); `None` for SD 1.x/2.x.
    pub text_encoder_2: Option<(ClipTextModel, ClipTokenizer)>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL base: true): with no
    /// negative prompt given, the unconditional embeddings are zeros (diffusers).
    pub force_zeros_for_empty_prompt: bool,
    /// `model_index.json`'s `requires_aesthetics_score` (the SDXL refiner): the time ids end
    /// with an aesthetic score instead of the target size.
    pub requires_aesthetics_score: bool,
    /// The VAE's dtype: `dtype`, or f32 for an SDXL VAE with `force_upcast` in an f16 model.
    pub vae_dtype: DType,
    pub scheduler_config: SchedulerConfig,
    /// Where the UNet (and the ControlNets given to it) run, and in what dtype.
    pub device: Device,
    pub dtype: DType,
    /// Where the text encoders and the VAE run ([`Offload`]).
    pub aux_device: Device,
    /// Textual-inversion embeddings the prompts may name ([`Self::set_embeddings`]).
    pub embeddings: crate::text::embeddings::EmbeddingSet,
    /// When the VAE works in tiles.
    pub vae_tiling: VaeTiling,
}

/// Where the text encoders and the VAE run. `Cpu` (`--lowvram`): on the CPU in f32 (its fast
/// kernels), as stable-diffusion.cpp's `--clip-on-cpu --vae-on-cpu`, so that a GPU holds only
/// the UNet and the ControlNets; embeddings cross to the device once per generation, latents
/// once each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Offload {
    /// beside the UNet, in its dtype (the VAE upcast where its config says)
    #[default]
    None,
    Cpu,
}

impl Offload {
    /// The device and dtype the text encoders load to.
    pub fn text_placement(self, device: &Device, dtype: DType) -> (Device, DType) {
        match self {
            Offload::None => (device.clone(), dtype),
            Offload::Cpu => (Device::Cpu, DType::F32),
        }
    }
    /// The VAE's dtype, given the one it would have beside the UNet.
    pub fn vae_dtype(self, beside_unet: DType) -> DType {
        match self {
            Offload::None => beside_unet,
            Offload::Cpu => DType::F32,
        }
    }
}

/// When the VAE decodes and encodes in tiles (diffusers' `enable_tiling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VaeTiling {
    /// Tiles when the whole image's VAE working memory would exceed `budget` bytes.
    Auto {
        tiles: Option<crate::model::vae::VaeTiles>,
        budget: u64,
    },
    /// Always tiles (images larger than one tile).
    On(Option<crate::model::vae::VaeTiles>),
    Off,
}

impl Default for VaeTiling {
    fn default() -> Self {
        Self::Auto {
            tiles: None,
            budget: VAE_TILING_BUDGET,
        }
    }
}

/// `VaeTiling::Auto`'s default budget: 4 GiB of VAE activations (an SD VAE at about 1450x1450
/// in f32).
pub const VAE_TILING_BUDGET: u64 = 4 << 30;

impl StableDiffusion {
    /// True for 9-channel inpainting UNets.
    pub fn is_inpaint_model(&self) -> bool {
        self.unet.config().in_channels == 2 * self.vae.config().latent_channels + 1
    }

    /// True for SD 2 depth models (5-channel UNets: the latents and a depth map).
    pub fn is_depth_model(&self) -> bool {
        self.unet.config().in_channels == self.vae.config().latent_channels + 1
    }

    /// True for SDXL-class models (a UNet with the `text_time` added embedding).
    pub fn is_sdxl(&self) -> bool {
        self.unet.config().text_time.is_some()
    }

    /// The hidden widths of the text encoders, in encoding order (an embedding must have
    /// vectors for each).
    pub fn text_widths(&self) -> Vec<usize> {
        let mut w = vec![self.text_encoder.config().hidden_size];
        w.extend(
            self.text_encoder_2
                .as_ref()
                .map(|(te, _)| te.config().hidden_size),
        );
        w
    }

    /// Make the embeddings of `all` that fit this model's encoders available to its prompts;
    /// returns the names left out and why.
    pub fn set_embeddings(
        &mut self,
        all: &[crate::text::embeddings::TextualInversion],
    ) -> Vec<(String, String)> {
        let (set, skipped) =
            crate::text::embeddings::EmbeddingSet::for_model(all, &self.text_widths());
        self.embeddings = set;
        skipped
    }

    /// The names of the embeddings `prompt` uses.
    pub fn embeddings_used(&self, prompt: &str) -> Result<Vec<String>, crate::error::Error> {
        crate::text::embeddings_used(&self.tokenizer, prompt, &self.embeddings)
    }

    /// The tiles the VAE works in for `batch` images of `width` x `height`, or `None` (whole).
    pub fn vae_tiles(
        &self,
        batch: usize,
        width: usize,
        height: usize,
    ) -> Option<crate::model::vae::VaeTiles> {
        // a tile size of 0: the VAE's own (`sample_size`), with the given overlap
        let fill = |t: Option<crate::model::vae::VaeTiles>| {
            let d = self.vae.default_tiles();
            match t {
                Some(t) if t.sample > 0 => t,
                Some(t) => crate::model::vae::VaeTiles {
                    overlap: t.overlap,
                    ..d
                },
                None => d,
            }
        };
        let bytes = self.vae.config().values_per_pixel()
            * (batch * width * height) as f64
            * self.vae_dtype.size_in_bytes() as f64;
        match self.vae_tiling {
            VaeTiling::Off => None,
            VaeTiling::On(t) => Some(fill(t)),
            VaeTiling::Auto { tiles, budget } if bytes > budget as f64 => Some(fill(tiles)),
            VaeTiling::Auto { .. } => None,
        }
    }

    /// The model family, as messages and `model inspect` name it.
    pub fn family(&self) -> &'static str {
        self.unet.config().family()
    }
}
