//! Control images: RGB in [0, 1] at the generation size. Grayscale is expanded, alpha is
//! composited over white (the annotators' `HWC3`), and the size is fitted with
//! sd-webui-controlnet's resize modes.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, Rgb, RgbImage};
use sd_plugins_api::{marked_control_values, ImageBuf};
use sd_preprocessors::map_resize::high_quality_resize;

use crate::error::{ControlError, Result};
use crate::units::ResizeMode;

/// RGB pixels of an image file, alpha composited over white.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    if !path.is_file() {
        return Err(ControlError::file(path, "control image not found"));
    }
    let img = sd_plugins_api::image_input::open_image(path)
        .map_err(|e| ControlError::file(path, format!("cannot read control image: {e}")))?;
    Ok(match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other if other.color().has_alpha() => {
            let rgba = other.to_rgba8();
            let mut out = RgbImage::new(rgba.width(), rgba.height());
            for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
                let a = p.0[3] as f32 / 255.0;
                let mix =
                    |c: u8| (c as f32 * a + 255.0 * (1.0 - a)).round().clamp(0.0, 255.0) as u8;
                *o = Rgb([mix(p.0[0]), mix(p.0[1]), mix(p.0[2])]);
            }
            out
        }
        other => other.to_rgb8(),
    })
}

/// Median colour of the border pixels, per channel (sd-webui-controlnet's fill background:
/// `np.median(...).astype(uint8)`, the mean of the two middle values truncated).
fn border_median(img: &ImageBuf) -> Vec<u8> {
    let (w, h, ch) = (img.width, img.height, img.channels);
    let px = |x: usize, y: usize| &img.data[(y * w + x) * ch..(y * w + x + 1) * ch];
    let mut border = Vec::new();
    for x in 0..w {
        border.push(px(x, 0));
        border.push(px(x, h - 1));
    }
    for y in 0..h {
        border.push(px(0, y));
        border.push(px(w - 1, y));
    }
    (0..ch)
        .map(|c| {
            let mut v: Vec<u8> = border.iter().map(|p| p[c]).collect();
            v.sort_unstable();
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                ((v[n / 2 - 1] as u16 + v[n / 2] as u16) / 2) as u8
            }
        })
        .collect()
}

/// The extension's `safeint`: `int(np.round(x))`, ties to even.
fn safeint(x: f64) -> u32 {
    x.round_ties_even() as u32
}

/// An RGB image as a 3-channel buffer (no copy).
pub fn rgb_buf(img: RgbImage) -> ImageBuf {
    ImageBuf {
        width: img.width() as usize,
        height: img.height() as usize,
        channels: 3,
        data: img.into_raw(),
    }
}

/// Fit a control map (RGB, or RGBA whose alpha marks the pixels to repaint with 0) to
/// `width` x `height` as sd-webui-controlnet's `detectmap_proc` does, every resize its
/// `high_quality_resize`: `just` stretches; `crop` scales to cover and centre-crops; `fill`
/// scales to fit and pads with the original map's border median (the padding marked for
/// repainting, the extension's "inpaint hijack").
pub fn fit_map(img: &ImageBuf, width: usize, height: usize, mode: ResizeMode) -> ImageBuf {
    let (w, h) = (img.width as f64, img.height as f64);
    let (kw, kh) = (width as f64 / w, height as f64 / h);
    let ch = img.channels;
    match mode {
        ResizeMode::Just => high_quality_resize(img, width, height),
        ResizeMode::Crop => {
            let k = kw.max(kh);
            let (nw, nh) = (
                (safeint(w * k) as usize).max(width),
                (safeint(h * k) as usize).max(height),
            );
            let s = high_quality_resize(img, nw, nh);
            let (x0, y0) = ((nw - width) / 2, (nh - height) / 2);
            let mut data = Vec::with_capacity(width * height * ch);
            for y in y0..y0 + height {
                data.extend_from_slice(&s.data[(y * nw + x0) * ch..(y * nw + x0 + width) * ch]);
            }
            ImageBuf {
                width,
                height,
                channels: ch,
                data,
            }
        }
        ResizeMode::Fill => {
            let k = kw.min(kh);
            let (nw, nh) = (
                (safeint(w * k) as usize).clamp(1, width),
                (safeint(h * k) as usize).clamp(1, height),
            );
            // the background is the median of the map's own border, before it is resized
            let mut background = border_median(img);
            if ch == 4 {
                background[3] = 0;
            }
            let s = high_quality_resize(img, nw, nh);
            let mut data: Vec<u8> = background
                .iter()
                .copied()
                .cycle()
                .take(width * height * ch)
                .collect();
            let (x0, y0) = ((width - nw) / 2, (height - nh) / 2);
            for y in 0..nh {
                let row = &s.data[y * nw * ch..(y + 1) * nw * ch];
                let at = ((y0 + y) * width + x0) * ch;
                data[at..at + nw * ch].copy_from_slice(row);
            }
            ImageBuf {
                width,
                height,
                channels: ch,
                data,
            }
        }
    }
}

/// `[1, 3, H, W]` in [0, 1] from an RGB buffer.
pub fn to_tensor(img: &ImageBuf, device: &Device) -> Result<Tensor> {
    debug_assert_eq!(img.channels, 3);
    let data: Vec<f32> = img.data.iter().map(|&v| v as f32 / 255.0).collect();
    Ok(
        Tensor::from_vec(data, (img.height, img.width, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_device(device)?,
    )
}

/// The control tensor of a marked RGBA image (the result of a preprocessor taking
/// [`sd_plugins_api::InputKind::MaskedImage`], alpha 0 = repaint): colours / 255, -1 at the
/// marked pixels, fitted to the generation size (the mark is resized with the
/// image and read back as mask > 0.5).
pub fn inpaint_tensor(
    marked: &ImageBuf,
    width: usize,
    height: usize,
    mode: ResizeMode,
    device: &Device,
) -> Result<Tensor> {
    let marked = fit_map(marked, width, height, mode);
    let values = marked_control_values(&marked);
    Ok(Tensor::from_vec(values, (height, width, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .to_device(device)?)
}

/// Load a control image at the generation size.
pub fn load_control_image(
    path: &Path,
    width: usize,
    height: usize,
    mode: ResizeMode,
    device: &Device,
) -> Result<Tensor> {
    to_tensor(
        &fit_map(&rgb_buf(load_rgb(path)?), width, height, mode),
        device,
    )
}

/// A unit's spatial mask `[1, 1, H, W]` in [0, 1] at the file's own size (white = full
/// effect): its first channel / 255, as sd-webui-controlnet takes `effective_region_mask`
/// (`get_pytorch_control(mask)[:, 0:1]`); each residual resizes it ([`crate::ControlUnit`]).
/// Only that channel becomes floats (a mask at the decoder's largest size stays near 1 GiB).
pub fn load_unit_mask(path: &Path, device: &Device) -> Result<Tensor> {
    let rgb = load_rgb(path)?;
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let first: Vec<f32> = rgb
        .as_raw()
        .iter()
        .step_by(3)
        .map(|&v| v as f32 / 255.0)
        .collect();
    Ok(Tensor::from_vec(first, (1, 1, h, w), &Device::Cpu)?.to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fit(img: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> RgbImage {
        let out = fit_map(&rgb_buf(img.clone()), width as usize, height as usize, mode);
        RgbImage::from_raw(width, height, out.data).unwrap()
    }

    #[test]
    fn crop_covers_and_centres() {
        // 40x20, left half red, right half blue; crop to 20x20 keeps the middle.
        let mut img = RgbImage::new(40, 20);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = if x < 20 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            };
        }
        let out = fit(&img, 20, 20, ResizeMode::Crop);
        assert_eq!(out.dimensions(), (20, 20));
        assert_eq!(out.get_pixel(2, 10).0, [255, 0, 0]);
        assert_eq!(out.get_pixel(17, 10).0, [0, 0, 255]);
    }

    #[test]
    fn fill_pads_with_the_border_median() {
        let mut img = RgbImage::from_pixel(20, 10, Rgb([10, 200, 30]));
        img.put_pixel(10, 5, Rgb([255, 255, 255]));
        let out = fit(&img, 20, 20, ResizeMode::Fill);
        assert_eq!(out.dimensions(), (20, 20));
        assert_eq!(out.get_pixel(0, 0).0, [10, 200, 30]); // padding
        assert_eq!(out.get_pixel(0, 19).0, [10, 200, 30]);
        assert_eq!(out.get_pixel(10, 10).0, [255, 255, 255]); // content is centred, not scaled
    }

    /// sd-webui-controlnet's OUTER_FIT takes the median of the original map's border (a thin
    /// frame that shrinking blurs away still sets the background) and rounds sizes with
    /// `np.round` (ties to even).
    #[test]
    fn fill_background_comes_from_the_original_border_and_sizes_round_to_even() {
        // 40x20, a one-pixel white frame around black: to 10x10 the map shrinks 4x to 10x5,
        // whose own border is grey; the background is the original border's white
        let mut img = RgbImage::new(40, 20);
        for (x, y, p) in img.enumerate_pixels_mut() {
            if x == 0 || y == 0 || x == 39 || y == 19 {
                *p = Rgb([255, 255, 255]);
            }
        }
        let out = fit(&img, 10, 10, ResizeMode::Fill);
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(5, 9).0, [255, 255, 255]);
        // np.round: ties to even
        assert_eq!([6.5, 7.5, 2.5, 3.49].map(safeint), [6, 8, 2, 3]);
    }

    #[test]
    fn just_stretches() {
        let img = RgbImage::from_pixel(30, 10, Rgb([1, 2, 3]));
        assert_eq!(fit(&img, 16, 24, ResizeMode::Just).dimensions(), (16, 24));
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let dir = std::env::temp_dir().join(format!("cn-alpha-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.png");
        let mut img = image::RgbaImage::from_pixel(4, 4, image::Rgba([0, 0, 0, 0]));
        img.put_pixel(1, 1, image::Rgba([0, 0, 0, 255]));
        img.save(&p).unwrap();
        let rgb = load_rgb(&p).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 1).0, [0, 0, 0]);
        let gray = dir.join("g.png");
        image::GrayImage::from_pixel(2, 2, image::Luma([77]))
            .save(&gray)
            .unwrap();
        assert_eq!(load_rgb(&gray).unwrap().get_pixel(0, 0).0, [77, 77, 77]);
        assert!(load_rgb(&dir.join("missing.png"))
            .unwrap_err()
            .to_string()
            .contains("missing.png"));
    }
}
