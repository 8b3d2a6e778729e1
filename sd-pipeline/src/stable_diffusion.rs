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
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
}

impl StableDiffusion {
    /// True for 9-channel inpainting UNets.
    pub fn is_inpaint_model(&self) -> bool {
        self.unet.config().in_channels == 2 * self.vae.config().latent_channels + 1
    }
}
