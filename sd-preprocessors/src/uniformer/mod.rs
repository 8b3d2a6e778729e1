//! `seg_ufade20k`: ADE20K semantic segmentation by UniFormer-S + UPerNet
//! (`upernet_global_small.pth` from lllyasviel/ControlNet's annotator checkpoints), as
//! sd-webui-controlnet's `annotator/uniformer` runs it (controlnet_aux 0.0.10 has no
//! segmentation; `seg_ofade20k`, OneFormer, is not built).
//!
//! The map (`inference_segmentor` with the config's test pipeline, then `show_result_pyplot`
//! with `get_palette('ade')` and opacity 1):
//! - the image at the processor resolution (done by [`crate::detect`]; sd-webui-controlnet's own
//!   sizing is `detect --pad`) is rescaled to fit `(2048, 512)` keeping its aspect (mmcv
//!   `imrescale`: factor `min(2048 / long side, 512 / short side)`, sides `int(side * factor +
//!   0.5)`, `cv2.resize` bilinear; so the network always sees a short side of 512);
//! - `Normalize(to_rgb=True)` swaps the channels of the RGB image it is given, so the network
//!   reads (B, G, R) minus the ImageNet means (123.675, 116.28, 103.53) over the standard
//!   deviations (58.395, 57.12, 57.375), in f32;
//! - the network ([`net`]) gives class logits at a quarter of its input, resized bilinearly
//!   (`align_corners=False`) to its input size, and again to the image's size when the
//!   rescale changed it; each pixel takes the class of its largest logit (the first on ties;
//!   the reference argmaxes the softmax of the same logits) and that class's ADE20K colour.
//!
//! Weights: `upernet_global_small.pth` (an mmcv checkpoint: `state_dict` under `meta`, read
//! without running its pickle code) or a `.safetensors` with the same keys.

pub mod net;

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use crate::cvresize::{resize, Interp};
use crate::lineart::cached;
use crate::segmentation::ADE20K_PALETTE;
pub use net::UperNet;

/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = [
    "upernet_global_small.pth",
    "upernet_global_small.safetensors",
];
/// The test pipeline's `img_scale` (long side, short side) the image is rescaled to fit.
pub const IMG_SCALE: (f64, f64) = (2048.0, 512.0);
/// `img_norm_cfg` of the ADE20K config, in the network's channel order.
const MEAN: [f32; 3] = [123.675, 116.28, 103.53];
const STD: [f32; 3] = [58.395, 57.12, 57.375];

/// mmcv's `rescale_size((w, h), (2048, 512))`: the network input size `(w, h)` of a `w` x `h`
/// image.
pub fn rescale_size(w: usize, h: usize) -> (usize, usize) {
    let (long, short) = IMG_SCALE;
    let f = (long / w.max(h) as f64).min(short / w.min(h) as f64);
    let side = |s: usize| (s as f64 * f + 0.5) as usize;
    (side(w), side(h))
}

/// The network input of an RGB image: rescaled ([`rescale_size`]), channels reversed and
/// normalised, `[1, 3, h, w]`.
pub fn network_input(rgb: &ImageBuf) -> candle_core::Result<Tensor> {
    let (nw, nh) = rescale_size(rgb.width, rgb.height);
    let img = if (nw, nh) == (rgb.width, rgb.height) {
        rgb.clone()
    } else {
        resize(rgb, nw, nh, Interp::Linear)
    };
    let plane = nw * nh;
    let mut v = vec![0f32; 3 * plane];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            // Normalize(to_rgb=True) on an RGB array: channel c of the input is px[2 - c]
            v[c * plane + i] = (px[2 - c] as f32 - MEAN[c]) * (1.0 / STD[c] as f64) as f32;
        }
    }
    Tensor::from_vec(v, (1, 3, nh, nw), &Device::Cpu)
}

/// The classes of a `w` x `h` image from the network's `[1, C, lh, lw]` logits for an input of
/// `input` = `(nw, nh)`: resized to the input, then to the image when that differs, argmax.
pub fn classes(
    logits: &Tensor,
    input: (usize, usize),
    (w, h): (usize, usize),
) -> candle_core::Result<Vec<u16>> {
    let (_, c, lh, lw) = logits.dims4()?;
    let hwc = logits
        .squeeze(0)?
        .permute((1, 2, 0))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (nw, nh) = input;
    let (src, sh, sw) = if (nw, nh) == (w, h) {
        (hwc, lh, lw)
    } else {
        (net::bilinear_hwc(&hwc, (lh, lw, c), (nh, nw)), nh, nw)
    };
    Ok(argmax_resized(&src, (sh, sw, c), (h, w)))
}

/// `argmax` over the channels of `bilinear_hwc(src)` at `oh` x `ow`, computed pixel by pixel.
fn argmax_resized(
    src: &[f32],
    (h, w, c): (usize, usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<u16> {
    // equal sizes give identity taps (weights 1 and 0): the values themselves
    let (ty, tx) = (
        crate::midas::bilinear_taps(h, oh),
        crate::midas::bilinear_taps(w, ow),
    );
    let mut out = vec![0u16; oh * ow];
    let threads = crate::conv::threads();
    let rows_per = oh.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (part, dst) in out.chunks_mut(rows_per * ow).enumerate() {
            let (ty, tx) = (&ty[part * rows_per..], &tx[..]);
            s.spawn(move || argmax_rows(src, (w, c), ty, tx, dst));
        }
    });
    out
}

type Taps = (usize, usize, f32, f32);

sd_pipeline::simd_dispatch!(fn argmax_rows(src: &[f32], wc: (usize, usize), ty: &[Taps], tx: &[Taps], dst: &mut [u16]) -> () = argmax_rows_body);

/// Rows of [`argmax_resized`]: `dst` holds whole output rows, `ty` their taps from the first.
#[inline(always)]
fn argmax_rows_body(
    src: &[f32],
    (w, c): (usize, usize),
    ty: &[Taps],
    tx: &[Taps],
    dst: &mut [u16],
) {
    let ow = tx.len();
    for (row, &(y0, y1, wy0, wy1)) in dst.chunks_mut(ow).zip(ty) {
        for (o, &(x0, x1, wx0, wx1)) in row.iter_mut().zip(tx) {
            let at = |y: usize, x: usize| &src[(y * w + x) * c..(y * w + x + 1) * c];
            let (a, b, cc, d) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
            let mut best = (f32::NEG_INFINITY, 0usize);
            for i in 0..c {
                let v = net::lerp2(a[i], b[i], cc[i], d[i], (wx0, wx1), (wy0, wy1));
                if v > best.0 {
                    best = (v, i);
                }
            }
            *o = best.1 as u16;
        }
    }
}

/// Each class's ADE20K colour (RGB; classes past the palette black).
pub fn colour(classes: &[u16], w: usize, h: usize) -> ImageBuf {
    let mut data = Vec::with_capacity(w * h * 3);
    for &k in classes {
        data.extend(ADE20K_PALETTE.get(k as usize).unwrap_or(&[0, 0, 0]));
    }
    ImageBuf {
        width: w,
        height: h,
        channels: 3,
        data,
    }
}

/// The segmentation map of an image (see the module documentation).
pub fn segment(net: &UperNet, input: &ImageBuf) -> Result<ImageBuf, String> {
    let rgb = hwc3(input);
    let (w, h) = (rgb.width, rgb.height);
    if w < 32 || h < 32 {
        return Err(format!(
            "image {w}x{h} is too small for UniFormer (32 pixels a side at least)"
        ));
    }
    if w.max(h) > 16 * w.min(h) {
        return Err(format!(
            "image {w}x{h} is too narrow to segment (sides over 16:1)"
        ));
    }
    let run = || -> candle_core::Result<Vec<u16>> {
        let x = network_input(&rgb)?;
        let (_, _, nh, nw) = x.dims4()?;
        let logits = net.forward(&x)?;
        classes(&logits, (nw, nh), (w, h))
    };
    let k = run().map_err(|e| e.to_string())?;
    Ok(colour(&k, w, h))
}

/// The network at `path`, loaded once per file per process.
pub fn load_cached(path: &Path) -> Result<std::sync::Arc<UperNet>, String> {
    static CACHE: OnceLock<
        std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, std::sync::Arc<UperNet>>>,
    > = OnceLock::new();
    cached(&CACHE, path, load)
}

/// The network of a weights file (an mmseg checkpoint or a safetensors of its state dict).
pub fn load(path: &Path) -> Result<UperNet, String> {
    let tensors = crate::weights::read_state_dict(
        path,
        "backbone.patch_embed1.proj.weight",
        &format!("UniFormer UPerNet weights {}", WEIGHT_FILES[0]),
        |k| k.starts_with("backbone.") || k.starts_with("decode_head."),
    )?;
    let net = UperNet::from_tensors(tensors).map_err(|e| {
        format!(
            "{}: {e} (not the UniFormer UPerNet weights {}?)",
            path.display(),
            WEIGHT_FILES[0]
        )
    })?;
    if net.classes() != ADE20K_PALETTE.len() {
        return Err(format!(
            "{}: the network has {} classes, the ADE20K palette {}",
            path.display(),
            net.classes(),
            ADE20K_PALETTE.len()
        ));
    }
    Ok(net)
}

/// `seg_ufade20k`.
pub struct SegUfade20k;

impl Preprocessor for SegUfade20k {
    fn name(&self) -> &str {
        "seg_ufade20k"
    }
    fn description(&self) -> &str {
        "ADE20K segmentation by UniFormer-S UPerNet (upernet_global_small.pth; \
         sd-webui-controlnet seg_ufade20k), coloured with the ADE20K palette"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![crate::lineart::model_param(&WEIGHT_FILES)]
    }
    fn cache_salt(&self, params: &Params) -> Result<String, PluginError> {
        crate::weights::weights_salt(self.name(), params, &WEIGHT_FILES)
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let path = crate::weights::find_weights(self.name(), params, &WEIGHT_FILES)?;
        let net = load_cached(&path).map_err(|e| PluginError::failed(self.name(), e))?;
        segment(&net, input).map_err(|e| PluginError::failed(self.name(), e))
    }
}

register_preprocessor!(SegUfade20k);
