//! The one preprocessing path: `sdctl detect` and a control unit's `preprocessor` both run a
//! preprocessor through [`detect_file`], so the same image, resolution and parameters give
//! the same map through either. The input is brought to the processor resolution first
//! (sd-webui-controlnet's `processor_res`: the short side to the resolution, sides rounded to
//! multiples of 64 as lllyasviel's `resize_image`, or with `pad` its
//! `resize_image_with_pad` and the padding cropped off after), unless the preprocessor works
//! at the image's own size ([`Preprocessor::uses_resolution`]).

use std::ops::RangeInclusive;
use std::path::Path;

use sd_plugins_api::{hwc3, ImageBuf, InputKind, Params, PluginError, Preprocessor, Registry};

use crate::resize::{detect_size, remove_pad, resize_image, resize_image_with_pad};

/// The processor resolutions accepted (`--resolution`, a unit's `resolution`).
pub const RESOLUTIONS: RangeInclusive<usize> = 64..=8192;

/// How the input is sized for the preprocessor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// The short side the input is brought to (A1111's `processor_res`, default 512).
    pub resolution: usize,
    /// sd-webui-controlnet's sizing: no rounding to 64, padded for detection and cropped
    /// back after.
    pub pad: bool,
}

impl Default for Sizing {
    fn default() -> Self {
        Self {
            resolution: 512,
            pad: false,
        }
    }
}

/// A detected map and whether it came from the preprocess cache.
pub struct Detected {
    pub map: ImageBuf,
    pub cached: bool,
}

/// An image file as an [`ImageBuf`]: RGB, or RGBA when it has transparency.
pub fn read_image(path: &Path) -> Result<ImageBuf, String> {
    let img = sd_plugins_api::image_input::open_image(path)
        .map_err(|e| format!("{}: cannot read the image: {e}", path.display()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if img.color().has_alpha() {
        ImageBuf::new(w, h, 4, img.to_rgba8().into_raw())
    } else {
        ImageBuf::new(w, h, 3, img.to_rgb8().into_raw())
    }
}

/// Run `p` on the file at `path`: an image (sized by `sizing`), or a file input it declares
/// (a pose file, drawn at `file_size` when the file gives no canvas). Errors name the file.
pub fn detect_file(
    registry: &Registry,
    p: &dyn Preprocessor,
    path: &Path,
    params: &Params,
    sizing: Sizing,
    file_size: (usize, usize),
) -> Result<Detected, String> {
    if let Some(kind) = InputKind::of_file(path) {
        if !p.takes(kind) {
            let readers: Vec<String> = registry
                .taking(kind)
                .map(|p| format!("`{}`", p.name()))
                .collect();
            let only = if readers.is_empty() {
                "no preprocessor takes it".to_string()
            } else {
                format!("only {} takes it", readers.join(" or "))
            };
            let ext = path.extension().unwrap_or_default().to_string_lossy();
            return Err(format!(
                "{}: a .{ext} input is {}; {only}",
                path.display(),
                kind.describe()
            ));
        }
        let map = p
            .process_file(path, file_size, params)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok(Detected { map, cached: false });
    }
    let input = read_image(path)?;
    detect(registry, p, &input, params, sizing)
        .map_err(|e| format!("{}: preprocessor {}: {e}", path.display(), p.name()))
}

/// Run `p` on an image (RGB, or RGBA: a preprocessor taking a masked image reads the
/// transparency as its mask, which is resized along; the others get it composited over white).
pub fn detect(
    registry: &Registry,
    p: &dyn Preprocessor,
    input: &ImageBuf,
    params: &Params,
    sizing: Sizing,
) -> Result<Detected, PluginError> {
    let keep_alpha = p.takes(InputKind::MaskedImage) && input.channels == 4;
    let (colours, alpha) = if keep_alpha {
        (channels(input, &[0, 1, 2]), Some(channels(input, &[3])))
    } else {
        (hwc3(input), None)
    };
    let joined = |rgb: ImageBuf, alpha: Option<ImageBuf>| match alpha {
        Some(a) => with_alpha(&rgb, &a),
        None => rgb,
    };
    if p.uses_resolution() {
        check_processor_size(p.name(), input, sizing)?;
    }
    let (map, cached) = if !p.uses_resolution() {
        registry.run(p, &joined(colours, alpha), params)?
    } else if sizing.pad {
        let (padded, size) = resize_image_with_pad(&colours, sizing.resolution);
        let alpha = alpha.map(|a| resize_image_with_pad(&a, sizing.resolution).0);
        let (out, cached) = registry.run(p, &joined(padded, alpha), params)?;
        (remove_pad(&out, size), cached)
    } else {
        let resized = resize_image(&colours, sizing.resolution);
        let alpha = alpha.map(|a| resize_image(&a, sizing.resolution));
        registry.run(p, &joined(resized, alpha), params)?
    };
    Ok(Detected { map, cached })
}

/// The chosen channels of an image (`[3]`: the alpha of RGBA as grey; `[0, 1, 2]`: its
/// colours, not composited).
fn channels(img: &ImageBuf, which: &[usize]) -> ImageBuf {
    ImageBuf {
        width: img.width,
        height: img.height,
        channels: which.len(),
        data: img
            .data
            .chunks_exact(img.channels)
            .flat_map(|p| which.iter().map(move |&c| p[c]))
            .collect(),
    }
}

/// RGB plus the first channel of `alpha` as RGBA.
fn with_alpha(rgb: &ImageBuf, alpha: &ImageBuf) -> ImageBuf {
    let data = rgb
        .data
        .chunks_exact(3)
        .zip(alpha.data.chunks_exact(alpha.channels))
        .flat_map(|(c, a)| [c[0], c[1], c[2], a[0]])
        .collect();
    ImageBuf {
        width: rgb.width,
        height: rgb.height,
        channels: 4,
        data,
    }
}

/// The size an image is brought to at the processor resolution, checked before it is
/// made: a 2x16000 strip at resolution 512 would become 512 x 4096000 (issue 30). Sides up
/// to the image reader's limit, and the resized image and the annotator's maps within the
/// memory available (`sd_plugins_api::memory`).
fn check_processor_size(name: &str, input: &ImageBuf, sizing: Sizing) -> Result<(), PluginError> {
    use sd_plugins_api::image_input::MAX_SIDE;
    let (w, h) = detect_size(input.width, input.height, sizing.resolution);
    let fail = |m: String| PluginError::failed(name, m);
    if w > MAX_SIDE as usize || h > MAX_SIDE as usize {
        return Err(fail(format!(
            "the {}x{} image at processor resolution {} (its short side to {}) would be {w}x{h}, \
             more than {MAX_SIDE} pixels a side; crop the image or lower the resolution",
            input.width, input.height, sizing.resolution, sizing.resolution
        )));
    }
    let cost = sd_plugins_api::memory::Cost {
        // the resized image, its float copies and the annotator's maps
        per_pixel: 64.0,
        fixed: 0,
        peak: "the resized image and the annotator's maps".into(),
    };
    sd_plugins_api::memory::check("processor size", w, h, 1, 64, &cost).map_err(fail)
}
