//! `dw_openpose_full`: DWPose whole-body keypoints (body, feet, face, hands), as
//! sd-webui-controlnet runs it (`annotator/openpose/{wholebody,cv_ox_det,cv_ox_pose}.py`) from
//! the ONNX files users have: YOLOX-L (`yolox_l.onnx`) finds the people, RTMPose-L
//! (`dw-ll_ucoco_384.onnx`) their 133 keypoints, drawn with the OpenPose drawing of
//! `draw_poses`. Both networks run on [`crate::onnx`].
//!
//! 1. Detector: the image letterboxed into 640x640 (`cv2.resize` bilinear, padding 114, 0-255
//!    values in the image's channel order), the raw `[1, 8400, 85]` output decoded on the
//!    stride 8/16/32 grids, NMS at IoU 0.45 over scores above 0.1, then persons (class 0)
//!    scoring above 0.3.
//! 2. Pose: each box padded by 1.25, widened to 288:384, cut out by `cv2.warpAffine`
//!    ([`warp`]), normalised by ImageNet's mean and std; SimCC x/y decoded by their maxima
//!    (split ratio 2), the score the smaller of the two maxima.
//! 3. Keypoints: neck = the shoulders' mean, reordered to OpenPose's 18 body points; points
//!    scoring under 0.3 are missing; face = the 68 face points plus the two eyes.

pub mod warp;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Device, Tensor};
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, InputKind, ParamSpec, Params, PluginError, Preprocessor,
};

use crate::cvresize::{self, Interp};
use crate::draw::Canvas;
use crate::onnx::Model;
use crate::pose::{draw_body, draw_face, draw_hand, Keypoint, Person, Pose};
use crate::pose_detect::PoseDetector;
use crate::register_pose_detector;
use crate::weights::{find_weights_param, weights_salt_param};

const NAME: &str = "dw_openpose_full";
/// The detector's file in the annotator folder (ONNX first, then ComfyUI's TorchScript).
pub const DET_FILES: [&str; 2] = ["yolox_l.onnx", "yolox_l.torchscript.pt"];
/// The pose network's file in the annotator folder (ONNX first, then ComfyUI's TorchScript).
pub const POSE_FILES: [&str; 2] = ["dw-ll_ucoco_384.onnx", "dw-ll_ucoco_384_bs5.torchscript.pt"];

/// The detector's square input side.
pub const DET_SIZE: usize = 640;
/// The pose network's input (width, height).
pub const POSE_SIZE: (usize, usize) = (288, 384);
const STRIDES: [usize; 3] = [8, 16, 32];
const NMS_IOU: f32 = 0.45;
const NMS_SCORE: f32 = 0.1;
const PERSON_SCORE: f64 = 0.3;
const KEYPOINT_SCORE: f64 = 0.3;
const SIMCC_SPLIT: f32 = 2.0;
const MEAN: [f64; 3] = [123.675, 116.28, 103.53];
const STD: [f64; 3] = [58.395, 57.12, 57.375];
/// Whole-body keypoints of the pose network (COCO-WholeBody).
pub const KEYPOINTS: usize = 133;

/// The two networks of a detection (the ONNX files, or stand-ins in tests).
pub trait DwNetworks {
    /// The detector on a `[1, 3, 640, 640]` input: `[1, 8400, 5 + classes]`.
    fn detect(&self, input: &Tensor) -> Result<Tensor, String>;
    /// The pose network on a `[1, 3, 384, 288]` crop: (`simcc_x`, `simcc_y`).
    fn pose(&self, input: &Tensor) -> Result<(Tensor, Tensor), String>;
}

/// The networks from their ONNX files.
pub struct OnnxNetworks {
    pub det: Arc<Network>,
    pub pose: Arc<Network>,
}

/// A network and the batch its graph runs (1 for the ONNX files; a TorchScript pose file
/// whose traced code fixes its batch, as ComfyUI's `bs5` may, runs that batch: one crop and
/// zeros, as ComfyUI pads its crops).
pub struct Network {
    pub model: Model,
    pub batch: usize,
}

fn only_input(m: &Model, what: &str) -> Result<String, String> {
    match m.input_names() {
        [one] => Ok(one.clone()),
        other => Err(format!(
            "the {what} should have one input, it has {}",
            other.len()
        )),
    }
}

impl DwNetworks for OnnxNetworks {
    fn detect(&self, input: &Tensor) -> Result<Tensor, String> {
        let det = &self.det.model;
        let name = only_input(det, "detector")?;
        let out = det.run(&[(&name, input.clone())])?;
        out.into_iter()
            .next()
            .ok_or_else(|| "the detector has no output".into())
    }
    fn pose(&self, input: &Tensor) -> Result<(Tensor, Tensor), String> {
        let pose = &self.pose.model;
        let name = only_input(pose, "pose network")?;
        let batch = self.pose.batch;
        let x = if batch > 1 {
            // the crop, then zero crops to the graph's batch
            Tensor::zeros(
                [vec![batch - 1], input.dims()[1..].to_vec()].concat(),
                input.dtype(),
                input.device(),
            )
            .and_then(|zeros| Tensor::cat(&[input, &zeros], 0))
            .map_err(|e| e.to_string())?
        } else {
            input.clone()
        };
        let mut out = pose.run(&[(&name, x)])?;
        if batch > 1 {
            for o in &mut out {
                *o = o.narrow(0, 0, 1).map_err(|e| e.to_string())?;
            }
        }
        let names = pose.output_names();
        let by = |n: &str| names.iter().position(|o| o == n);
        let (ix, iy) = match (by("simcc_x"), by("simcc_y")) {
            (Some(x), Some(y)) => (x, y),
            _ if out.len() == 2 => (0, 1),
            _ => {
                return Err(format!(
                    "the pose network should give simcc_x and simcc_y, it gives {names:?}"
                ))
            }
        };
        Ok((out[ix].clone(), out[iy].clone()))
    }
}

/// `cv_ox_det.preprocess`: the image letterboxed into 640x640 (top-left, padding 114) as a
/// `[1, 3, 640, 640]` tensor of 0-255 values, and the scale `r` applied.
pub fn det_input(rgb: &ImageBuf) -> Result<(Tensor, f64), String> {
    let (w, h) = (rgb.width, rgb.height);
    let r = (DET_SIZE as f64 / h as f64).min(DET_SIZE as f64 / w as f64);
    let (nw, nh) = ((w as f64 * r) as usize, (h as f64 * r) as usize);
    if nw == 0 || nh == 0 {
        return Err(format!(
            "a {w}x{h} image is too narrow to letterbox into {DET_SIZE}x{DET_SIZE}"
        ));
    }
    let resized = if (nw, nh) == (w, h) {
        rgb.clone()
    } else {
        cvresize::resize(rgb, nw, nh, Interp::Linear)
    };
    let plane = DET_SIZE * DET_SIZE;
    let mut v = vec![114f32; 3 * plane];
    for y in 0..nh {
        for x in 0..nw {
            for c in 0..3 {
                v[c * plane + y * DET_SIZE + x] = resized.data[(y * nw + x) * 3 + c] as f32;
            }
        }
    }
    let t =
        Tensor::from_vec(v, (1, 3, DET_SIZE, DET_SIZE), &Device::Cpu).map_err(|e| e.to_string())?;
    Ok((t, r))
}

/// `inference_detector` after the network: the person boxes `[x1, y1, x2, y2]` in image pixels
/// (`demo_postprocess`, `multiclass_nms(nms_thr=0.45, score_thr=0.1)`, then class 0 above 0.3),
/// in NMS order. Arithmetic in float32 where numpy's is.
pub fn det_boxes(output: &Tensor, ratio: f64) -> Result<Vec<[f64; 4]>, String> {
    let dims = output.dims().to_vec();
    let rows: usize = STRIDES
        .iter()
        .map(|s| (DET_SIZE / s) * (DET_SIZE / s))
        .sum();
    if dims.len() != 3 || dims[0] != 1 || dims[1] != rows || dims[2] < 6 {
        return Err(format!(
            "the detector gave {dims:?}, not [1, {rows}, 5 + classes] (a YOLOX export for \
             640x640 without decoding)"
        ));
    }
    let cols = dims[2];
    let o: Vec<f32> = output
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(|e| e.to_string())?;
    let mut boxes: Vec<[f32; 4]> = Vec::new();
    let mut scores: Vec<f32> = Vec::new();
    let mut i = 0;
    let rf = ratio as f32;
    for &s in &STRIDES {
        let n = DET_SIZE / s;
        for gy in 0..n {
            for gx in 0..n {
                let row = &o[i * cols..(i + 1) * cols];
                i += 1;
                // scores = obj * cls; only the person class is kept in the end, and NMS is
                // per class
                let score = row[4] * row[5];
                if score.is_nan() || score <= NMS_SCORE {
                    continue;
                }
                let sf = s as f64;
                let cx = ((row[0] as f64 + gx as f64) * sf) as f32;
                let cy = ((row[1] as f64 + gy as f64) * sf) as f32;
                let bw = (row[2].exp() as f64 * sf) as f32;
                let bh = (row[3].exp() as f64 * sf) as f32;
                boxes.push([
                    (cx - bw / 2.0) / rf,
                    (cy - bh / 2.0) / rf,
                    (cx + bw / 2.0) / rf,
                    (cy + bh / 2.0) / rf,
                ]);
                scores.push(score);
            }
        }
    }
    let keep = nms(&boxes, &scores, NMS_IOU);
    Ok(keep
        .into_iter()
        .filter(|&k| scores[k] as f64 > PERSON_SCORE)
        .map(|k| boxes[k].map(|v| v as f64))
        .collect())
}

/// `cv_ox_det.nms`: greedy NMS by descending score (areas with the +1 pixel convention), the
/// indices kept.
fn nms(boxes: &[[f32; 4]], scores: &[f32], thr: f32) -> Vec<usize> {
    let area = |b: &[f32; 4]| (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0);
    // argsort()[::-1]: descending, equal scores in reverse index order
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(b.cmp(&a)));
    let mut keep = Vec::new();
    while let Some((&i, rest)) = order.split_first() {
        keep.push(i);
        let bi = boxes[i];
        order = rest
            .iter()
            .copied()
            .filter(|&j| {
                let bj = boxes[j];
                let w = (bi[2].min(bj[2]) - bi[0].max(bj[0]) + 1.0).max(0.0);
                let h = (bi[3].min(bj[3]) - bi[1].max(bj[1]) + 1.0).max(0.0);
                let inter = w * h;
                let ovr = inter / (area(&bi) + area(&bj) - inter);
                // np.where(ovr <= thr): NaN overlaps are dropped
                ovr <= thr
            })
            .collect();
    }
    keep
}

/// A box's crop for the pose network: its centre and (aspect-fixed) scale, the warp matrix,
/// and the 8-bit crop `warpAffine` makes (288x384, interleaved like the image).
pub struct Crop {
    pub center: [f64; 2],
    pub scale: [f64; 2],
    pub pixels: Vec<u8>,
}

/// `bbox_xyxy2cs(padding=1.25)`, `_fix_aspect_ratio` and `top_down_affine` of one box.
pub fn crop(rgb: &ImageBuf, b: [f64; 4]) -> Result<Crop, String> {
    let (pw, ph) = POSE_SIZE;
    let center = [(b[0] + b[2]) * 0.5, (b[1] + b[3]) * 0.5];
    let (w, h) = ((b[2] - b[0]) * 1.25, (b[3] - b[1]) * 1.25);
    let aspect = pw as f64 / ph as f64;
    let scale = if w > h * aspect {
        [w, w / aspect]
    } else {
        [h * aspect, h]
    };
    // get_warp_matrix(center, scale, rot=0, output_size=(w, h)) with its float32 points
    let f = |v: f64| v as f32;
    let src0 = [f(center[0]), f(center[1])];
    let src1 = [f(center[0] + 0.0), f(center[1] + scale[0] * -0.5)];
    let third = |a: [f32; 2], b: [f32; 2]| {
        let d = [a[0] - b[0], a[1] - b[1]];
        [b[0] - d[1], b[1] + d[0]]
    };
    let (dw, dh) = (pw as f32, ph as f32);
    let dst0 = [dw * 0.5, dh * 0.5];
    let dst1 = [dw * 0.5, dh * 0.5 - dw * 0.5];
    // an empty box gives OpenCV's zero matrix: a crop of the first pixel
    let m = warp::affine_transform(
        [src0, src1, third(src0, src1)],
        [dst0, dst1, third(dst0, dst1)],
    );
    let pixels = warp::warp_affine(&rgb.data, (rgb.width, rgb.height), 3, m, POSE_SIZE);
    Ok(Crop {
        center,
        scale,
        pixels,
    })
}

/// The pose network's input from a crop: `(pixel - mean) / std` per channel, `[1, 3, 384, 288]`.
pub fn pose_input(c: &Crop) -> Result<Tensor, String> {
    let (pw, ph) = POSE_SIZE;
    let plane = pw * ph;
    let mut v = vec![0f32; 3 * plane];
    for (i, px) in c.pixels.chunks_exact(3).enumerate() {
        for ch in 0..3 {
            v[ch * plane + i] = ((px[ch] as f64 - MEAN[ch]) / STD[ch]) as f32;
        }
    }
    Tensor::from_vec(v, (1, 3, ph, pw), &Device::Cpu).map_err(|e| e.to_string())
}

/// `decode` + the rescale of `postprocess`: per keypoint (x, y) in image pixels and its score.
pub fn keypoints(
    simcc_x: &Tensor,
    simcc_y: &Tensor,
    c: &Crop,
) -> Result<Vec<(f64, f64, f64)>, String> {
    let rows = |t: &Tensor, what: &str| -> Result<(Vec<f32>, usize, usize), String> {
        let d = t.dims().to_vec();
        if d.len() != 3 || d[0] != 1 || d[1] == 0 || d[2] == 0 {
            return Err(format!(
                "the pose network's {what} is {d:?}, not [1, K, bins]"
            ));
        }
        let v = t
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(|e| e.to_string())?;
        Ok((v, d[1], d[2]))
    };
    let (xs, kx, wx) = rows(simcc_x, "simcc_x")?;
    let (ys, ky, wy) = rows(simcc_y, "simcc_y")?;
    if kx != ky || kx != KEYPOINTS {
        return Err(format!(
            "the pose network gives {kx} and {ky} keypoints, not the {KEYPOINTS} of COCO-WholeBody"
        ));
    }
    // np.argmax (first maximum) and np.amax
    let arg = |v: &[f32]| {
        let mut best = 0;
        for (i, &x) in v.iter().enumerate() {
            if x > v[best] || (v[best].is_nan() && !x.is_nan()) {
                best = i;
            }
        }
        (best, v[best])
    };
    let (pw, ph) = (POSE_SIZE.0 as f64, POSE_SIZE.1 as f64);
    Ok((0..kx)
        .map(|k| {
            let (ix, vx) = arg(&xs[k * wx..(k + 1) * wx]);
            let (iy, vy) = arg(&ys[k * wy..(k + 1) * wy]);
            let val = if vx > vy { vy } else { vx };
            let (lx, ly) = if val <= 0.0 {
                (-1f32, -1f32)
            } else {
                (ix as f32, iy as f32)
            };
            let (lx, ly) = ((lx / SIMCC_SPLIT) as f64, (ly / SIMCC_SPLIT) as f64);
            let x = lx / pw * c.scale[0] + c.center[0] - c.scale[0] / 2.0;
            let y = ly / ph * c.scale[1] + c.center[1] - c.scale[1] / 2.0;
            (x, y, val as f64)
        })
        .collect())
}

/// `Wholebody.__call__` after the pose network: the neck inserted at 17 and the body reordered
/// to OpenPose's (134 points: x, y, score).
pub fn openpose_order(kp: &[(f64, f64, f64)]) -> Vec<(f64, f64, f64)> {
    let (a, b) = (kp[5], kp[6]);
    let both = a.2 > KEYPOINT_SCORE && b.2 > KEYPOINT_SCORE;
    let neck = (
        (a.0 + b.0) / 2.0,
        (a.1 + b.1) / 2.0,
        if both { 1.0 } else { 0.0 },
    );
    let mut v = kp.to_vec();
    v.insert(17, neck);
    const MMPOSE: [usize; 15] = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3];
    const OPENPOSE: [usize; 15] = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17];
    let src = v.clone();
    for (o, m) in OPENPOSE.iter().zip(MMPOSE) {
        v[*o] = src[m];
    }
    v
}

/// `Wholebody.format_result` of one person, keypoints normalised by the image size: body 0-17
/// (all missing: 18 missing points), face 24-91 plus the two eyes, hands 92-112 (left) and
/// 113-133 (right); a part whose points all score under 0.3 is left out.
pub fn person(info: &[(f64, f64, f64)], w: usize, h: usize) -> Person {
    let (w, h) = (w as f64, h as f64);
    let part = |r: std::ops::Range<usize>| -> Option<Vec<Keypoint>> {
        let v: Vec<Keypoint> = info[r]
            .iter()
            .map(|&(x, y, s)| (s >= KEYPOINT_SCORE).then_some((x / w, y / h)))
            .collect();
        v.iter().any(Option::is_some).then_some(v)
    };
    let body = part(0..18).unwrap_or_else(|| vec![None; 18]);
    let face = part(24..92).map(|mut f| {
        f.push(body[14]);
        f.push(body[15]);
        f
    });
    Person {
        face: face.unwrap_or_default(),
        left_hand: part(92..113).unwrap_or_default(),
        right_hand: part(113..134).unwrap_or_default(),
        body,
    }
}

/// The whole detection on an RGB image: the people, keypoints normalised by its size.
pub fn detect_pose(nets: &dyn DwNetworks, rgb: &ImageBuf) -> Result<Pose, String> {
    let (input, ratio) = det_input(rgb)?;
    let boxes = det_boxes(&nets.detect(&input)?, ratio)?;
    let mut pose = Pose::default();
    for b in boxes {
        let c = crop(rgb, b)?;
        let (sx, sy) = nets.pose(&pose_input(&c)?)?;
        let kp = openpose_order(&keypoints(&sx, &sy, &c)?);
        pose.people.push(person(&kp, rgb.width, rgb.height));
    }
    Ok(pose)
}

/// sd-webui-controlnet's `draw_poses` of the detector's people (pixel keypoints, as the
/// detector hands them over): body, left hand, right hand, face.
pub fn draw(pose: &Pose, width: usize, height: usize) -> ImageBuf {
    let mut c = Canvas::new(width, height);
    let (w, h) = (width as f64, height as f64);
    let px = |v: &[Keypoint]| -> Vec<Keypoint> {
        v.iter().map(|k| k.map(|(x, y)| (x * w, y * h))).collect()
    };
    for p in &pose.people {
        if !p.body.is_empty() {
            draw_body(&mut c, &px(&p.body));
        }
        for hand in [&p.left_hand, &p.right_hand] {
            if !hand.is_empty() {
                draw_hand(&mut c, &px(hand));
            }
        }
        if !p.face.is_empty() {
            draw_face(&mut c, &px(&p.face));
        }
    }
    ImageBuf {
        width: c.width,
        height: c.height,
        channels: 3,
        data: c.data,
    }
}

type ModelCache = Mutex<HashMap<(PathBuf, u64, u128, Role), Arc<Network>>>;

/// Which of DWPose's two networks a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Detector,
    Pose,
}

impl Role {
    /// The input name and shape, and the output names, of the network's ONNX file.
    pub fn signature(self) -> (&'static str, [usize; 4], &'static [&'static str]) {
        match self {
            Role::Detector => ("images", [1, 3, DET_SIZE, DET_SIZE], &["output"]),
            Role::Pose => (
                "input",
                [1, 3, POSE_SIZE.1, POSE_SIZE.0],
                &["simcc_x", "simcc_y"],
            ),
        }
    }
}

/// A TorchScript file of one of DWPose's networks as the ONNX model its ONNX file would be
/// (the network told by its outputs: one for the detector, `simcc_x` and `simcc_y` for the
/// pose network); the pose network is converted for one crop at a time, whatever batch it was
/// traced with.
pub fn convert_torchscript(path: &Path) -> Result<(crate::onnx::proto::ModelProto, Role), String> {
    let program = crate::onnx::torchscript::Program::open(path)?;
    let role = match program.outputs() {
        1 => Role::Detector,
        2 => Role::Pose,
        n => {
            return Err(format!(
                "{}: a network with {n} outputs is neither DWPose's detector (1) nor its pose network (2)",
                path.display()
            ))
        }
    };
    let (input, mut shape, outputs) = role.signature();
    let model = match program.to_onnx(input, &shape, outputs) {
        Ok(m) => m,
        // a pose graph traced with a fixed batch (ComfyUI pads crops to batches of 5)
        Err(first) if role == Role::Pose => {
            shape[0] = TORCHSCRIPT_POSE_BATCH;
            program.to_onnx(input, &shape, outputs).map_err(|_| {
                format!(
                    "{}: {first} (and at a batch of {TORCHSCRIPT_POSE_BATCH})",
                    path.display()
                )
            })?
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    Ok((model, role))
}

/// The batch ComfyUI runs its TorchScript pose file with (`dw-ll_ucoco_384_bs5`), tried when
/// a file does not convert for one crop.
pub const TORCHSCRIPT_POSE_BATCH: usize = 5;

/// The batch of a converted graph's first input.
fn input_batch(model: &crate::onnx::proto::ModelProto) -> usize {
    model
        .graph
        .as_ref()
        .and_then(|g| g.input.first())
        .and_then(|i| i.r#type.as_ref())
        .and_then(|t| t.tensor_type.as_ref())
        .and_then(|t| t.shape.as_ref())
        .and_then(|s| s.dim.first())
        .map_or(1, |d| d.dim_value.max(1) as usize)
}

/// Whether a weights file is a TorchScript archive rather than ONNX (a zip: ONNX files are
/// protobuf).
pub fn is_torchscript(path: &Path) -> bool {
    sd_weights::sniff::is_zip(path)
}

/// A network's file, ONNX or TorchScript (converted), checked to be the `role` network.
pub fn load_network(path: &Path, role: Role) -> Result<Network, String> {
    if !is_torchscript(path) {
        // the batch its input declares (a --convert of a fixed-batch TorchScript file), else 1
        let proto = crate::onnx::decode_file(path)?;
        let batch = input_batch(&proto);
        return Ok(Network {
            model: Model::from_proto(proto).map_err(|e| format!("{}: {e}", path.display()))?,
            batch,
        });
    }
    let (model, found) = convert_torchscript(path)?;
    if found != role {
        return Err(format!(
            "{}: this TorchScript file holds DWPose's {found:?} network, not its {role:?} network",
            path.display()
        ));
    }
    let batch = input_batch(&model);
    Ok(Network {
        model: Model::from_proto(model).map_err(|e| format!("{}: {e}", path.display()))?,
        batch,
    })
}

/// A network's file (ONNX, or TorchScript converted), loaded once per process (per path, size
/// and modification time).
pub fn load_model_cached(path: &Path, role: Role) -> Result<Arc<Network>, String> {
    static CACHE: OnceLock<ModelCache> = OnceLock::new();
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let key = (path.to_path_buf(), meta.len(), mtime, role);
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(m) = cache.get(&key) {
        return Ok(m.clone());
    }
    let m = Arc::new(load_network(path, role)?);
    cache.insert(key, m.clone());
    Ok(m)
}

/// The `dw_openpose_full` preprocessor.
pub struct DwOpenposeFull;

impl DwOpenposeFull {
    fn fail(e: String) -> PluginError {
        PluginError::failed(NAME, e)
    }
}

impl PoseDetector for DwOpenposeFull {
    fn name(&self) -> &str {
        NAME
    }
    fn detect_pose(&self, rgb: &ImageBuf, params: &Params) -> Result<Pose, PluginError> {
        let det = find_weights_param(NAME, params, "det_model", &DET_FILES)?;
        let pose = find_weights_param(NAME, params, "pose_model", &POSE_FILES)?;
        let nets = OnnxNetworks {
            det: load_model_cached(&det, Role::Detector).map_err(Self::fail)?,
            pose: load_model_cached(&pose, Role::Pose).map_err(Self::fail)?,
        };
        detect_pose(&nets, rgb).map_err(Self::fail)
    }
    fn draw(&self, pose: &Pose, width: usize, height: usize) -> ImageBuf {
        draw(pose, width, height)
    }
}

impl Preprocessor for DwOpenposeFull {
    fn name(&self) -> &str {
        NAME
    }
    fn description(&self) -> &str {
        "DWPose whole-body pose: body, feet, hands and face (sd-webui-controlnet \
         dw_openpose_full; yolox_l.onnx + dw-ll_ucoco_384.onnx, or ComfyUI's TorchScript files); \
         also draws keypoint JSON files"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::string(
                "det_model",
                "",
                "yolox_l.onnx or yolox_l.torchscript.pt (the YOLOX-L person detector); empty: \
                 looked for in the annotator folder",
            ),
            ParamSpec::string(
                "pose_model",
                "",
                "dw-ll_ucoco_384.onnx or dw-ll_ucoco_384_bs5.torchscript.pt (the RTMPose-L \
                 whole-body network); empty: looked for in the annotator folder",
            ),
        ]
    }
    fn cache_salt(&self, params: &Params) -> Result<String, PluginError> {
        Ok(format!(
            "{}|{}",
            weights_salt_param(NAME, params, "det_model", &DET_FILES)?,
            weights_salt_param(NAME, params, "pose_model", &POSE_FILES)?
        ))
    }
    /// Photos, and keypoint JSON files (drawn whole).
    fn input_kinds(&self) -> &[InputKind] {
        &[InputKind::Image, InputKind::PoseFile]
    }
    fn process_file(
        &self,
        path: &Path,
        size: (usize, usize),
        _params: &Params,
    ) -> Result<ImageBuf, PluginError> {
        crate::pose::render_file(path, size).map_err(Self::fail)
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let pose = PoseDetector::detect_pose(self, &rgb, params)?;
        Ok(draw(&pose, rgb.width, rgb.height))
    }
}

register_preprocessor!(DwOpenposeFull);
register_pose_detector!(DwOpenposeFull);
