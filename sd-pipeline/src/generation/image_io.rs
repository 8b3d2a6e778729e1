//! Image files in and out: init images and masks as diffusers' VaeImageProcessor prepares
//! them, and PNG output with an A1111-style `parameters` text chunk, written atomically.

use std::io::BufWriter;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView};

use crate::error::{Error, Result};

/// An image file, checked against the input limits; errors name the file.
pub fn open(path: &Path) -> Result<DynamicImage> {
    if !path.is_file() {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: "file not found".into(),
        });
    }
    sd_plugins_api::image_input::open_image(path).map_err(|message| Error::Image {
        path: path.to_path_buf(),
        message,
    })
}

/// Size `(width, height)` of an image file.
pub fn image_size(path: &Path) -> Result<(usize, usize)> {
    let (w, h) = open(path)?.dimensions();
    Ok((w as usize, h as usize))
}

fn resized(img: DynamicImage, width: usize, height: usize) -> DynamicImage {
    if img.width() as usize == width && img.height() as usize == height {
        img
    } else {
        // diffusers resizes with PIL's Lanczos; this Lanczos3 is close, not bit-identical.
        img.resize_exact(width as u32, height as u32, FilterType::Lanczos3)
    }
}

/// An RGB image as `[1, 3, height, width]` in [-1, 1] (`2 * x / 255 - 1`).
pub fn load_image(path: &Path, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    image_tensor(open(path)?, width, height, device)
}

/// [`load_image`] of an image already read.
pub fn image_tensor(
    img: DynamicImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let img = resized(img, width, height).to_rgb8();
    let data: Vec<f32> = img
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 255.0)
        .collect();
    let t = Tensor::from_vec(data, (height, width, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?;
    Ok(((t * 2.0)? - 1.0)?.to_device(device)?)
}

/// A mask as `[1, 1, height, width]` of 0 and 1: grayscale (PIL's "L" conversion), scaled to
/// [0, 1] and binarised at 0.5, as diffusers' mask processor. White = repaint.
pub fn load_mask(path: &Path, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    mask_tensor(open(path)?, width, height, device)
}

/// [`load_mask`] of an image already read.
pub fn mask_tensor(
    img: DynamicImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let img = resized(img, width, height);
    let gray: Vec<f32> = match img {
        DynamicImage::ImageLuma8(g) => g.into_raw().into_iter().map(|v| v as f32).collect(),
        other => other
            .to_rgb8()
            .pixels()
            // PIL: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16
            .map(|p| {
                let [r, g, b] = p.0;
                ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as f32
            })
            .collect(),
    };
    let data: Vec<f32> = gray
        .into_iter()
        .map(|v| if v / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, height, width), device)?)
}

/// 8-bit RGB pixels of one image `[3, H, W]` in [0, 1] (diffusers: `(x * 255).round()`).
pub fn to_rgb8(image: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let (c, h, w) = image.dims3()?;
    if c != 3 {
        return Err(Error::Invalid(format!(
            "expected a 3-channel image, got {c} channels"
        )));
    }
    let data: Vec<f32> = image
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1()?;
    Ok((
        w,
        h,
        data.into_iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect(),
    ))
}

/// Write one image `[3, H, W]` in [0, 1] as PNG at `path` (no temporary file: callers that
/// need all-or-nothing output write to temporary names and rename, see [`save_png`] and
/// [`crate::output`]).
pub fn write_png(path: &Path, image: &Tensor, text: &[(&str, &str)]) -> Result<()> {
    let (w, h, pixels) = to_rgb8(image)?;
    let img_err = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        // tEXt holds Latin-1 only; anything else goes in a UTF-8 iTXt chunk (as PIL does)
        let r = if value.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk(key.to_string(), value.to_string())
        } else {
            enc.add_itxt_chunk(key.to_string(), value.to_string())
        };
        r.map_err(|e| img_err(e.to_string()))?;
    }
    let mut writer = enc.write_header().map_err(|e| img_err(e.to_string()))?;
    writer
        .write_image_data(&pixels)
        .map_err(|e| img_err(e.to_string()))?;
    writer.finish().map_err(|e| img_err(e.to_string()))
}

/// Write one image as PNG; the file appears only when complete (see
/// [`crate::output::write_atomic`]).
pub fn save_png(path: &Path, image: &Tensor, text: &[(&str, &str)]) -> Result<()> {
    crate::output::write_atomic(path, |tmp| write_png(tmp, image, text))
}
