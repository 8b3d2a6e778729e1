//! `openpose_hand` (body + hands), `openpose_face` (body + face), `openpose_faceonly` and
//! `openpose_full` (body + hands + face), named as sd-webui-controlnet's modules: controlnet_aux
//! 0.0.10's `OpenposeDetector` with `include_hand` / `include_face` (hand and face boxes from
//! the body's keypoints, `Hand` and `Face` on each box, `draw_poses` with the chosen parts).
//! Each is also a [`PoseDetector`], as is the body-only `openpose`, so `sdctl detect --json`
//! writes what they found.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::Device;
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, InputKind, ParamSpec, Params, PluginError, Preprocessor,
};

use super::cpm::CpmNet;
use super::face::{self, face_box, face_heatmaps, face_keypoints, face_peaks, FaceNetwork};
use super::hand::{self, crop, hand_boxes, hand_keypoints, hand_peaks, HandNetwork};
use super::{load_cached, maps, people, to_pose, PoseNetwork, WEIGHT_FILES};
use crate::draw::Canvas;
use crate::pose::{draw_body, draw_face, draw_hand, render, Keypoint, Pose};
use crate::pose_detect::PoseDetector;
use crate::register_pose_detector;
use crate::weights::{find_weights_param, weights_salt_param};

/// Which parts a preprocessor finds and draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    pub body: bool,
    pub hands: bool,
    pub face: bool,
}

/// The networks of a detection: the body's always (the hand and face boxes come from it).
pub struct Networks<'a> {
    pub body: &'a dyn PoseNetwork,
    pub hand: Option<&'a dyn HandNetwork>,
    pub face: Option<&'a dyn FaceNetwork>,
}

/// `OpenposeDetector.detect_poses` on an RGB image: the people, keypoints normalised by the
/// image size; each person's hands (when `nets.hand` is given) and face (when `nets.face`).
pub fn detect_parts(nets: &Networks, rgb: &ImageBuf) -> Result<Pose, String> {
    let device = Device::Cpu;
    let m = maps(nets.body, rgb, &device)?;
    let (cands, rows) = people(&m);
    let (w, h) = (rgb.width, rgb.height);
    let mut pose = to_pose(&cands, &rows, w, h);
    if nets.hand.is_none() && nets.face.is_none() {
        return Ok(pose);
    }
    // the detector works on BGR: the networks see the crops in that order
    let bgr = ImageBuf {
        data: rgb
            .data
            .chunks_exact(3)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect(),
        ..rgb.clone()
    };
    for (person, row) in pose.people.iter_mut().zip(&rows) {
        // the body's keypoints in pixels, as handDetect / faceDetect read them
        let body: Vec<Keypoint> = row[..18]
            .iter()
            .map(|&i| {
                (i >= 0.0).then(|| {
                    let c = cands[i as usize];
                    (c.x as f64, c.y as f64)
                })
            })
            .collect();
        if let Some(net) = nets.hand {
            for b in hand_boxes(&body, w, h) {
                let c = crop(&bgr, b.x, b.y, b.side, b.side);
                let kp = hand_keypoints(&hand_peaks(net, &c, &device)?, &b, w, h);
                if b.left {
                    person.left_hand = kp;
                } else {
                    person.right_hand = kp;
                }
            }
        }
        if let Some(net) = nets.face {
            if let Some(b) = face_box(&body, w, h) {
                let c = crop(&bgr, b.x, b.y, b.side, b.side);
                let maps = face_heatmaps(net, &c, &device)?;
                person.face = face_keypoints(&face_peaks(&maps, (c.width, c.height)), &b, w, h);
            }
        }
    }
    Ok(pose)
}

/// Hand and face points of a detection for [`draw_hand`] / [`draw_face`], which multiply in
/// float64: controlnet_aux multiplies their float32 values by the canvas side in float32
/// (`int(k.x * W)`), so each point becomes the centre of the pixel that product truncates to.
fn as_detected(points: &[Keypoint], w: usize, h: usize) -> Vec<Keypoint> {
    let px = |v: f64, side: usize| ((v as f32 * side as f32).trunc() as f64 + 0.5) / side as f64;
    points
        .iter()
        .map(|k| k.map(|(x, y)| (px(x, w), px(y, h))))
        .collect()
}

/// `draw_poses(poses, H, W, draw_body, draw_hand, draw_face)` on a black canvas: per person
/// the body, the left and right hands, then the face. `detected`: the pose came from
/// [`detect_parts`] (hand and face points drawn as the detector's float32 values are), else
/// from a keypoint file (drawn as sd-webui-controlnet draws decoded JSON).
pub fn draw_parts(
    pose: &Pose,
    width: usize,
    height: usize,
    parts: Parts,
    detected: bool,
) -> ImageBuf {
    let mut c = Canvas::new(width, height);
    let fit = |pts: &[Keypoint]| {
        if detected {
            as_detected(pts, width, height)
        } else {
            pts.to_vec()
        }
    };
    for p in &pose.people {
        if parts.body && !p.body.is_empty() {
            draw_body(&mut c, &p.body);
        }
        if parts.hands {
            for hand in [&p.left_hand, &p.right_hand] {
                if !hand.is_empty() {
                    draw_hand(&mut c, &fit(hand));
                }
            }
        }
        if parts.face && !p.face.is_empty() {
            draw_face(&mut c, &fit(&p.face));
        }
    }
    ImageBuf {
        width: c.width,
        height: c.height,
        channels: 3,
        data: c.data,
    }
}

type CpmCache = Mutex<HashMap<(PathBuf, usize), Arc<CpmNet>>>;

/// The hand or face network at `path`, loaded once per process.
pub fn load_cpm_cached(path: &Path, outputs: usize, what: &str) -> Result<Arc<CpmNet>, String> {
    static CACHE: OnceLock<CpmCache> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = (path.to_path_buf(), outputs);
    if let Some(n) = cache.get(&key) {
        return Ok(n.clone());
    }
    let n = Arc::new(CpmNet::load(path, outputs, what, &Device::Cpu)?);
    cache.insert(key, n.clone());
    Ok(n)
}

const HAND_WHAT: &str = "OpenPose hand model (hand_pose_model.pth)";
const FACE_WHAT: &str = "OpenPose face model (facenet.pth)";

/// One of the four preprocessors.
pub struct OpenposeParts {
    name: &'static str,
    parts: Parts,
    description: &'static str,
}

impl OpenposeParts {
    /// The weight files in use: (parameter, file names) of the body, hand and face networks
    /// it needs.
    fn weights(&self) -> Vec<(&'static str, &'static [&'static str])> {
        let mut v: Vec<(&'static str, &'static [&'static str])> = vec![("model", &WEIGHT_FILES)];
        if self.parts.hands {
            v.push(("hand_model", &hand::WEIGHT_FILES));
        }
        if self.parts.face {
            v.push(("face_model", &face::WEIGHT_FILES));
        }
        v
    }

    fn fail(&self, e: String) -> PluginError {
        PluginError::failed(self.name, e)
    }
}

impl PoseDetector for OpenposeParts {
    fn name(&self) -> &str {
        self.name
    }
    fn detect_pose(&self, rgb: &ImageBuf, params: &Params) -> Result<Pose, PluginError> {
        // every weight file is found (or named as missing) before anything runs
        let body = find_weights_param(self.name, params, "model", &WEIGHT_FILES)?;
        let hand = self
            .parts
            .hands
            .then(|| find_weights_param(self.name, params, "hand_model", &hand::WEIGHT_FILES))
            .transpose()?;
        let face = self
            .parts
            .face
            .then(|| find_weights_param(self.name, params, "face_model", &face::WEIGHT_FILES))
            .transpose()?;
        let body = load_cached(&body).map_err(|e| self.fail(e))?;
        let hand = hand
            .map(|p| load_cpm_cached(&p, hand::OUTPUTS, HAND_WHAT))
            .transpose()
            .map_err(|e| self.fail(e))?;
        let face = face
            .map(|p| load_cpm_cached(&p, face::OUTPUTS, FACE_WHAT))
            .transpose()
            .map_err(|e| self.fail(e))?;
        let nets = Networks {
            body: body.as_ref(),
            hand: hand.as_deref().map(|n| n as &dyn HandNetwork),
            face: face.as_deref().map(|n| n as &dyn FaceNetwork),
        };
        detect_parts(&nets, rgb).map_err(|e| self.fail(e))
    }
    fn draw(&self, pose: &Pose, width: usize, height: usize) -> ImageBuf {
        draw_parts(pose, width, height, self.parts, true)
    }
}

impl Preprocessor for OpenposeParts {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> &str {
        self.description
    }
    fn params(&self) -> Vec<ParamSpec> {
        self.weights()
            .into_iter()
            .map(|(key, files)| {
                let help = format!("{} or .safetensors", files[0]);
                ParamSpec::string(
                    key,
                    "",
                    &format!("{help}; empty: looked for in the annotator folder"),
                )
            })
            .collect()
    }
    fn cache_salt(&self, params: &Params) -> Result<String, PluginError> {
        let mut salt = Vec::new();
        for (key, files) in self.weights() {
            salt.push(weights_salt_param(self.name, params, key, files)?);
        }
        Ok(salt.join("|"))
    }
    /// Photos, and keypoint JSON files (drawn with this preprocessor's parts).
    fn input_kinds(&self) -> &[InputKind] {
        &[InputKind::Image, InputKind::PoseFile]
    }
    fn process_file(
        &self,
        path: &Path,
        size: (usize, usize),
        _params: &Params,
    ) -> Result<ImageBuf, PluginError> {
        let pose = Pose::from_file(path).map_err(|e| self.fail(e))?;
        let (w, h) = pose.canvas(None, None, size).map_err(|e| self.fail(e))?;
        Ok(draw_parts(&pose, w, h, self.parts, false))
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let pose = self.detect_pose(&rgb, params)?;
        Ok(PoseDetector::draw(self, &pose, rgb.width, rgb.height))
    }
}

/// `openpose_hand`.
pub const OPENPOSE_HAND: OpenposeParts = OpenposeParts {
    name: "openpose_hand",
    parts: Parts {
        body: true,
        hands: true,
        face: false,
    },
    description: "OpenPose body and hands (controlnet_aux OpenposeDetector include_hand; \
                  body_pose_model.pth + hand_pose_model.pth); also draws keypoint JSON files",
};

/// `openpose_face`.
pub const OPENPOSE_FACE: OpenposeParts = OpenposeParts {
    name: "openpose_face",
    parts: Parts {
        body: true,
        hands: false,
        face: true,
    },
    description: "OpenPose body and face (controlnet_aux OpenposeDetector include_face; \
                  body_pose_model.pth + facenet.pth); also draws keypoint JSON files",
};

/// `openpose_faceonly`.
pub const OPENPOSE_FACEONLY: OpenposeParts = OpenposeParts {
    name: "openpose_faceonly",
    parts: Parts {
        body: false,
        hands: false,
        face: true,
    },
    description: "OpenPose face points only (found from the body: body_pose_model.pth + \
                  facenet.pth; controlnet_aux include_body=False); also draws keypoint JSON files",
};

/// `openpose_full`.
pub const OPENPOSE_FULL: OpenposeParts = OpenposeParts {
    name: "openpose_full",
    parts: Parts {
        body: true,
        hands: true,
        face: true,
    },
    description: "OpenPose body, hands and face (controlnet_aux OpenposeDetector include_hand \
                  and include_face; body_pose_model.pth + hand_pose_model.pth + facenet.pth); \
                  also draws keypoint JSON files",
};

register_preprocessor!(OPENPOSE_HAND);
register_preprocessor!(OPENPOSE_FACE);
register_preprocessor!(OPENPOSE_FACEONLY);
register_preprocessor!(OPENPOSE_FULL);
register_pose_detector!(OPENPOSE_HAND);
register_pose_detector!(OPENPOSE_FACE);
register_pose_detector!(OPENPOSE_FACEONLY);
register_pose_detector!(OPENPOSE_FULL);

/// The body-only `openpose` as a pose detector (its preprocessor is [`super::Openpose`]).
pub struct OpenposeBody;

impl PoseDetector for OpenposeBody {
    fn name(&self) -> &str {
        "openpose"
    }
    fn detect_pose(&self, rgb: &ImageBuf, params: &Params) -> Result<Pose, PluginError> {
        let path = find_weights_param("openpose", params, "model", &WEIGHT_FILES)?;
        let net = load_cached(&path).map_err(|e| PluginError::failed("openpose", e))?;
        super::detect(net.as_ref(), rgb).map_err(|e| PluginError::failed("openpose", e))
    }
    fn draw(&self, pose: &Pose, width: usize, height: usize) -> ImageBuf {
        let c = render(pose, width, height);
        ImageBuf {
            width: c.width,
            height: c.height,
            channels: 3,
            data: c.data,
        }
    }
}

register_pose_detector!(OpenposeBody);
