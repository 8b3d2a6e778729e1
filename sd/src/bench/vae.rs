//! `sdctl bench vae`: an SD 1.5-size VAE decode (random weights, the real architecture) at a
//! given size, whole or in tiles: seconds and the process's peak memory. Run one setting per
//! process: the peak is the process's own.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sd_pipeline::model::config::VaeConfig;
use sd_pipeline::model::vae::{AutoencoderKL, VaeTiles};
use serde::Serialize;

use super::measure::{once, peak_rss_bytes};
use super::random::RandomWeights;
use crate::error::Result;

pub struct VaeBench {
    /// Image side in pixels (latents are a side / 8).
    pub size: usize,
    /// `None`: whole; else tiles of this many image pixels, a quarter overlap.
    pub tile: Option<usize>,
    pub device: Device,
    /// f32, f16, or bf16 (on the CPU: f32 tensors, bf16 products).
    pub dtype: DType,
}

#[derive(Debug, Serialize)]
pub struct VaeReport {
    pub size: usize,
    pub tile: Option<usize>,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// SD 1.5's VAE (`stable-diffusion-v1-5/vae/config.json`).
fn sd15_vae() -> VaeConfig {
    let cfg = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;
    let raw = serde_json::from_str(cfg).expect("a fixed config");
    VaeConfig::from_raw(&raw, std::path::Path::new("<sd15 vae>")).expect("a fixed config")
}

impl VaeBench {
    pub fn run(&self) -> Result<VaeReport> {
        let dtype = crate::device::compute_dtype(&self.device, self.dtype)?;
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, self.device.clone());
        let vae = AutoencoderKL::new(&sd15_vae(), vb.pp("vae"))?;
        let z = Tensor::randn(
            0f32,
            1.0,
            (1, 4, self.size / 8, self.size / 8),
            &self.device,
        )?
        .to_dtype(dtype)?;
        let seconds = once(&self.device, &|| {
            let img = match self.tile {
                Some(t) => vae.decode_tiled(
                    &z,
                    VaeTiles {
                        sample: t,
                        overlap: 0.25,
                    },
                )?,
                None => vae.decode(&z)?,
            };
            img.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            Ok(())
        })?;
        Ok(VaeReport {
            size: self.size,
            tile: self.tile,
            seconds,
            peak_rss_bytes: peak_rss_bytes(),
        })
    }
}
