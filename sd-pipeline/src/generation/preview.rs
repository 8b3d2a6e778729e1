//! Live previews of the latents while sampling: A1111's "Approx cheap" (a linear map from the
//! four SD latent channels to RGB, `sd_samplers_common.py`) at the latents' size, or a TAESD
//! decode at the image size ([`crate::model::taesd`]).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::model::taesd::AutoencoderTiny;

/// How previews are made.
#[derive(Clone, Default)]
pub enum PreviewDecoder {
    /// A1111's "Approx cheap": no model, latent-sized.
    #[default]
    Cheap,
    /// TAESD / TAESDXL: image-sized, a few milliseconds per 64x64 latent.
    Taesd(Arc<AutoencoderTiny>),
}

/// The first image of `latents` `[B, 4, h, w]` as RGB8: `(width, height, pixels)`; `None` for
/// latents the cheap map has no coefficients for (not 4 channels).
pub fn preview_rgb(
    latents: &Tensor,
    decoder: &PreviewDecoder,
) -> Result<Option<(usize, usize, Vec<u8>)>> {
    let first = latents.narrow(0, 0, 1)?;
    match decoder {
        PreviewDecoder::Taesd(t) => {
            let img = t.decode_images(&first)?;
            Ok(Some(crate::generation::image_io::to_rgb8(&img.get(0)?)?))
        }
        PreviewDecoder::Cheap => Ok(cheap_rgb(&first)?),
    }
}

fn cheap_rgb(latents: &Tensor) -> Result<Option<(usize, usize, Vec<u8>)>> {
    const COEFS: [[f32; 3]; 4] = [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ];
    let (_, c, h, w) = latents.dims4()?;
    if c != 4 {
        return Ok(None);
    }
    let x: Vec<f32> = latents
        .get(0)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut rgb = vec![0u8; w * h * 3];
    for i in 0..w * h {
        for (r, out) in rgb[i * 3..][..3].iter_mut().enumerate() {
            let v: f32 = (0..4).map(|l| x[l * h * w + i] * COEFS[l][r]).sum();
            *out = (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0) as u8;
        }
    }
    Ok(Some((w, h, rgb)))
}
