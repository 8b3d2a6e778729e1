//! `openpose`: body keypoints by the CMU network (controlnet_aux `OpenposeDetector`, body
//! only), drawn as controlnet_aux draws them. A keypoint JSON file is accepted in place of a
//! photo (see [`crate::pose`]).

pub mod assemble;
pub mod cpm;
pub mod face;
pub mod hand;
pub mod net;
pub mod variants;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Device, Tensor};
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, InputKind, ParamSpec, Params, PluginError, Preprocessor,
};

use crate::cvresize::{self, Interp};
use crate::cvresize_f32::resize_f32;
use crate::pose::{render, Person, Pose};
use assemble::{assemble, find_peaks, Candidate, PersonRow};
pub use net::BodyNet;

const NAME: &str = "openpose";
/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["body_pose_model.pth", "body_pose_model.safetensors"];

const BOXSIZE: f64 = 368.0;
pub(crate) const STRIDE: usize = 8;
pub(crate) const PAD_VALUE: u8 = 128;

/// Network outputs brought back to the image: heatmaps (H x W x 19) and PAFs (H x W x 38).
pub struct Maps {
    pub width: usize,
    pub height: usize,
    pub heat: Vec<f64>,
    pub paf: Vec<f64>,
}

/// controlnet_aux `smart_resize`: AREA when shrinking (by the sum of the sides), else LANCZOS4.
pub(crate) fn smart_interp(from: (usize, usize), to: (f64, f64)) -> Interp {
    let k = (to.0 + to.1) / (from.0 + from.1) as f64;
    if k < 1.0 {
        Interp::Area
    } else {
        Interp::Lanczos4
    }
}

/// HWC f32 from `[1, C, h, w]`.
pub(crate) fn to_hwc(t: &Tensor) -> candle_core::Result<(Vec<f32>, usize, usize, usize)> {
    let (_, c, h, w) = t.dims4()?;
    let v = t
        .squeeze(0)?
        .permute((1, 2, 0))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((v, c, h, w))
}

/// Upsample a network output x8, drop the padding, resize to the image (`Body.__call__`).
pub fn upsample(
    out: &[f32],
    (c, h, w): (usize, usize, usize),
    unpadded: (usize, usize),
    image: (usize, usize),
) -> Vec<f64> {
    let (uw, uh) = (w * STRIDE, h * STRIDE);
    let up = resize_f32(
        out,
        w,
        h,
        c,
        uw,
        uh,
        smart_interp((h, w), (uh as f64, uw as f64)),
    );
    let (cw, ch) = unpadded;
    let mut crop = Vec::with_capacity(cw * ch * c);
    for y in 0..ch {
        crop.extend_from_slice(&up[y * uw * c..(y * uw + cw) * c]);
    }
    let (iw, ih) = image;
    let interp = smart_interp((ch, cw), (ih as f64, iw as f64));
    resize_f32(&crop, cw, ch, c, iw, ih, interp)
        .into_iter()
        .map(f64::from)
        .collect()
}

/// What gives the part maps for a `[1, 3, H, W]` input (BGR, `/256 - 0.5`, sides multiples of
/// 8): (PAFs `[1, 38, H/8, W/8]`, heatmaps `[1, 19, H/8, W/8]`). [`BodyNet`], or canned
/// outputs where a test replaces the network as controlnet_aux's `Body.model` can be replaced.
pub trait PoseNetwork {
    fn part_maps(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)>;
}

impl PoseNetwork for BodyNet {
    fn part_maps(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        self.forward(x)
    }
}

/// The network on an RGB image, its outputs brought to the image size.
pub fn maps(net: &dyn PoseNetwork, rgb: &ImageBuf, device: &Device) -> Result<Maps, String> {
    let (w, h) = (rgb.width, rgb.height);
    // The detector works on BGR (detect_poses flips the channels).
    let bgr: Vec<u8> = rgb
        .data
        .chunks_exact(3)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    let bgr = ImageBuf {
        data: bgr,
        ..rgb.clone()
    };
    let scale = 0.5 * BOXSIZE / h as f64;
    let (tw, th) = (w as f64 * scale, h as f64 * scale);
    let (sw, sh) = (tw as usize, th as usize);
    if sw == 0 || sh == 0 {
        return Err(format!("image {w}x{h} is too small for the pose network"));
    }
    let small = cvresize::resize(&bgr, sw, sh, smart_interp((h, w), (th, tw)));
    let (pw, ph) = (sw.div_ceil(STRIDE) * STRIDE, sh.div_ceil(STRIDE) * STRIDE);
    let mut x = vec![PAD_VALUE as f32 / 256.0 - 0.5; 3 * pw * ph];
    for y in 0..sh {
        for xx in 0..sw {
            for c in 0..3 {
                x[c * pw * ph + y * pw + xx] =
                    small.data[(y * sw + xx) * 3 + c] as f32 / 256.0 - 0.5;
            }
        }
    }
    let run = || -> candle_core::Result<_> {
        let x = Tensor::from_vec(x, (1, 3, ph, pw), &Device::Cpu)?.to_device(device)?;
        let (paf, heat) = net.part_maps(&x)?;
        Ok((
            to_hwc(&paf.to_device(&Device::Cpu)?)?,
            to_hwc(&heat.to_device(&Device::Cpu)?)?,
        ))
    };
    let ((paf, pc, oh, ow), (heat, hc, _, _)) = run().map_err(|e| e.to_string())?;
    Ok(Maps {
        width: w,
        height: h,
        heat: upsample(&heat, (hc, oh, ow), (sw, sh), (w, h)),
        paf: upsample(&paf, (pc, oh, ow), (sw, sh), (w, h)),
    })
}

/// People from the maps: candidates and the reference's subset rows.
pub fn people(m: &Maps) -> (Vec<Candidate>, Vec<PersonRow>) {
    let peaks = find_peaks(&m.heat, m.width, m.height);
    assemble(&peaks, &m.paf, m.width, m.height)
}

/// The pose of the detected people, keypoints normalised by the image size.
pub fn to_pose(candidates: &[Candidate], rows: &[PersonRow], w: usize, h: usize) -> Pose {
    let people = rows
        .iter()
        .map(|r| Person {
            body: r[..18]
                .iter()
                .map(|&i| {
                    (i >= 0.0).then(|| {
                        let c = candidates[i as usize];
                        (c.x as f64 / w as f64, c.y as f64 / h as f64)
                    })
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    Pose {
        people,
        canvas_width: Some(w),
        canvas_height: Some(h),
    }
}

fn model_cache() -> &'static Mutex<HashMap<PathBuf, Arc<BodyNet>>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<BodyNet>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The body network at `path`, loaded once per process.
pub fn load_cached(path: &Path) -> Result<Arc<BodyNet>, String> {
    let mut cache = model_cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = cache.get(path) {
        return Ok(n.clone());
    }
    let n = Arc::new(BodyNet::load(path, &Device::Cpu)?);
    cache.insert(path.to_path_buf(), n.clone());
    Ok(n)
}

/// Detect the people in an RGB image.
pub fn detect(net: &dyn PoseNetwork, rgb: &ImageBuf) -> Result<Pose, String> {
    let m = maps(net, rgb, &Device::Cpu)?;
    let (cands, rows) = people(&m);
    Ok(to_pose(&cands, &rows, rgb.width, rgb.height))
}

/// What the `openpose` preprocessor makes of an image (any channel count): the people found
/// by `net`, drawn on black at the image's size.
pub fn pose_map(net: &dyn PoseNetwork, input: &ImageBuf) -> Result<ImageBuf, String> {
    let rgb = hwc3(input);
    let pose = detect(net, &rgb)?;
    let c = render(&pose, rgb.width, rgb.height);
    Ok(ImageBuf {
        width: c.width,
        height: c.height,
        channels: 3,
        data: c.data,
    })
}

/// `openpose`: the CMU body network and controlnet_aux's drawing.
pub struct Openpose;

impl Preprocessor for Openpose {
    fn name(&self) -> &str {
        NAME
    }
    fn description(&self) -> &str {
        "OpenPose body skeleton (CMU COCO-18 network, body_pose_model.pth); \
         also draws keypoint JSON files"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::string(
            "model",
            "",
            "body_pose_model.pth or .safetensors; empty: looked for in the annotator folder",
        )]
    }
    fn cache_salt(&self, params: &Params) -> Result<String, PluginError> {
        crate::weights::weights_salt(NAME, params, &WEIGHT_FILES)
    }
    /// Photos, and keypoint JSON files (from any pose editor) drawn as detections are.
    fn input_kinds(&self) -> &[InputKind] {
        &[InputKind::Image, InputKind::PoseFile]
    }
    /// A keypoint file drawn on its canvas (`canvas_width` / `canvas_height`, else `size`).
    /// Needs no weights. Errors name the problem, not the file.
    fn process_file(
        &self,
        path: &Path,
        size: (usize, usize),
        _params: &Params,
    ) -> Result<ImageBuf, PluginError> {
        crate::pose::render_file(path, size).map_err(|e| PluginError::failed(NAME, e))
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let path = crate::weights::find_weights(NAME, params, &WEIGHT_FILES)?;
        let net = load_cached(&path).map_err(|e| PluginError::failed(NAME, e))?;
        pose_map(net.as_ref(), input).map_err(|e| PluginError::failed(NAME, e))
    }
}

register_preprocessor!(Openpose);
