//! `inpaint`: the control image of ControlNet 1.1's inpaint model. The colours of the image
//! with the pixels to repaint marked; the ControlNet sees `img / 255` there set to -1
//! (diffusers' `make_inpaint_condition`: `image[mask > 0.5] = -1.0`).
//!
//! The marked image travels as RGBA: alpha 0 = repaint (mask > 0.5), alpha 255 = keep.

use std::path::Path;

use sd_plugins_api::{
    register_preprocessor, ImageBuf, InputKind, ParamSpec, Params, PluginError, Preprocessor,
};

/// The control values of a marked image: RGB / 255, and -1 in every channel of a marked
/// pixel. HWC, f32. (The contract's [`sd_plugins_api::marked_control_values`].)
pub use sd_plugins_api::marked_control_values as control_values;

const NAME: &str = "inpaint";

/// Whether a mask value (0..255, white = repaint) marks a pixel: `mask / 255 > 0.5`.
pub fn is_masked(m: u8) -> bool {
    m as f32 / 255.0 > 0.5
}

/// RGBA with alpha 0 where `mask` (grey, white = repaint) marks a pixel.
pub fn mark(rgb: &ImageBuf, mask: &[u8]) -> ImageBuf {
    let mut data = Vec::with_capacity(rgb.width * rgb.height * 4);
    for (px, &m) in rgb.data.chunks_exact(3).zip(mask) {
        data.extend([px[0], px[1], px[2], if is_masked(m) { 0 } else { 255 }]);
    }
    ImageBuf {
        width: rgb.width,
        height: rgb.height,
        channels: 4,
        data,
    }
}

fn load_mask(path: &Path, w: usize, h: usize) -> Result<Vec<u8>, PluginError> {
    let img = sd_plugins_api::image_input::open_image(path).map_err(|e| {
        PluginError::failed(
            NAME,
            format!("{}: cannot read the mask: {e}", path.display()),
        )
    })?;
    let img = if (img.width() as usize, img.height() as usize) != (w, h) {
        // A mask drawn at another size is stretched to the image (nearest keeps it binary).
        img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Nearest)
    } else {
        img
    };
    Ok(img.to_luma8().into_raw())
}

/// `inpaint`: mark the pixels to repaint, from a mask file or the input's transparency.
pub struct Inpaint;

impl Preprocessor for Inpaint {
    fn name(&self) -> &str {
        NAME
    }
    fn description(&self) -> &str {
        "ControlNet 1.1 inpaint: the image with the masked pixels set to -1 (mask file or alpha)"
    }
    /// The image's transparency is its mask (when no mask file is given); the result is the
    /// marked image, RGBA.
    fn input_kinds(&self) -> &[InputKind] {
        &[InputKind::MaskedImage]
    }
    fn uses_resolution(&self) -> bool {
        false
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::string(
            "mask",
            "",
            "mask image, white = repaint; empty: the input's transparent pixels are repainted",
        )]
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let (w, h) = (input.width, input.height);
        let mask_file = params.str("mask").unwrap_or("");
        let rgb: Vec<u8> = input
            .data
            .chunks_exact(input.channels)
            .flat_map(|p| {
                if input.channels >= 3 {
                    [p[0], p[1], p[2]]
                } else {
                    [p[0]; 3]
                }
            })
            .collect();
        let rgb = ImageBuf {
            width: w,
            height: h,
            channels: 3,
            data: rgb,
        };
        let mask = if !mask_file.is_empty() {
            load_mask(Path::new(mask_file), w, h)?
        } else if input.channels == 4 {
            // Transparent = repaint.
            input.data.chunks_exact(4).map(|p| 255 - p[3]).collect()
        } else {
            return Err(PluginError::failed(
                NAME,
                "no mask: pass --param mask=FILE (white = repaint) or an image with transparency",
            ));
        };
        Ok(mark(&rgb, &mask))
    }
}

register_preprocessor!(Inpaint);
