//! Pose detectors: preprocessors whose map is a drawn pose and which can give the pose itself
//! (the OpenPose keypoint JSON of [`Pose::to_json`]), for `sdctl detect --json`. Each
//! registers with [`register_pose_detector!`] under its preprocessor's name; the map drawn
//! from the pose it gives is the preprocessor's map.

use std::path::Path;
use std::sync::Mutex;

use sd_plugins_api::{hwc3, ImageBuf, InputKind, ParamSpec, Params, PluginError, Preprocessor};
use sd_plugins_api::{inventory, Registry};

use crate::detect::{detect, detect_file, read_image, Sizing};
use crate::pose::Pose;

/// A preprocessor that detects poses and draws them.
pub trait PoseDetector: Send + Sync {
    /// Its preprocessor's name.
    fn name(&self) -> &str;
    /// The poses in an RGB image, keypoints normalised by the image size (the canvas is left
    /// unset).
    fn detect_pose(&self, rgb: &ImageBuf, params: &Params) -> Result<Pose, PluginError>;
    /// The preprocessor's map of a pose it detected, at this size.
    fn draw(&self, pose: &Pose, width: usize, height: usize) -> ImageBuf;
}

/// A registered pose detector (see [`register_pose_detector!`]).
pub struct PoseDetectorEntry {
    pub create: fn() -> Box<dyn PoseDetector>,
}

inventory::collect!(PoseDetectorEntry);

/// Register a pose detector (a `const`-constructible value), as `register_preprocessor!`
/// registers a preprocessor.
#[macro_export]
macro_rules! register_pose_detector {
    ($value:expr) => {
        ::sd_plugins_api::inventory::submit! {
            $crate::pose_detect::PoseDetectorEntry { create: || Box::new($value) }
        }
    };
}

/// The pose detector of the preprocessor `name`, if it is one.
pub fn pose_detector(name: &str) -> Option<Box<dyn PoseDetector>> {
    inventory::iter::<PoseDetectorEntry>
        .into_iter()
        .map(|e| (e.create)())
        .find(|d| d.name() == name)
}

/// The names of the pose detectors, sorted.
pub fn pose_detector_names() -> Vec<String> {
    let mut v: Vec<String> = inventory::iter::<PoseDetectorEntry>
        .into_iter()
        .map(|e| (e.create)().name().to_string())
        .collect();
    v.sort();
    v
}

/// A map and the pose it draws (canvas = the map's size).
pub struct DetectedPose {
    pub map: ImageBuf,
    pub pose: Pose,
}

/// [`detect_file`] for a pose detector, keeping the pose: an image is detected (never from the
/// result cache: the cache holds maps, not poses) through the same sizing as
/// [`detect`], the pose's keypoints normalised by the map it gives (with `pad`, the map
/// cropped back); a keypoint file gives its own pose. Errors name the file.
pub fn detect_file_with_pose(
    registry: &Registry,
    p: &dyn Preprocessor,
    det: &dyn PoseDetector,
    path: &Path,
    params: &Params,
    sizing: Sizing,
    file_size: (usize, usize),
) -> Result<DetectedPose, String> {
    if InputKind::of_file(path).is_some() {
        let out = detect_file(registry, p, path, params, sizing, file_size)?;
        let mut pose = Pose::from_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
        pose.canvas_width = Some(out.map.width);
        pose.canvas_height = Some(out.map.height);
        return Ok(DetectedPose { map: out.map, pose });
    }
    let input = read_image(path)?;
    let capture = Capture {
        p,
        det,
        seen: Mutex::new(None),
    };
    // a registry without a cache: the detector runs, and the capture sees its pose
    let out = detect(&Registry::builtin(), &capture, &input, params, sizing)
        .map_err(|e| format!("{}: preprocessor {}: {e}", path.display(), p.name()))?;
    let (pose, w, h) = capture
        .seen
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .ok_or_else(|| format!("{}: the pose detector did not run", p.name()))?;
    let map = out.map;
    Ok(DetectedPose {
        pose: reframe(pose, (w, h), (map.width, map.height)),
        map,
    })
}

/// Keypoints normalised by a `from` canvas, normalised by `to` (its top-left part).
fn reframe(mut pose: Pose, from: (usize, usize), to: (usize, usize)) -> Pose {
    if from != to {
        let (sx, sy) = (from.0 as f64 / to.0 as f64, from.1 as f64 / to.1 as f64);
        for p in &mut pose.people {
            for pts in [
                &mut p.body,
                &mut p.face,
                &mut p.left_hand,
                &mut p.right_hand,
            ] {
                for (x, y) in pts.iter_mut().flatten() {
                    *x *= sx;
                    *y *= sy;
                }
            }
        }
    }
    pose.canvas_width = Some(to.0);
    pose.canvas_height = Some(to.1);
    pose
}

/// The preprocessor `p` as `detect` runs it, through its pose detector, keeping the pose.
struct Capture<'a> {
    p: &'a dyn Preprocessor,
    det: &'a dyn PoseDetector,
    seen: Mutex<Option<(Pose, usize, usize)>>,
}

impl Preprocessor for Capture<'_> {
    fn name(&self) -> &str {
        self.p.name()
    }
    fn description(&self) -> &str {
        self.p.description()
    }
    fn params(&self) -> Vec<ParamSpec> {
        self.p.params()
    }
    fn input_kinds(&self) -> &[InputKind] {
        self.p.input_kinds()
    }
    fn uses_resolution(&self) -> bool {
        self.p.uses_resolution()
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let pose = self.det.detect_pose(&rgb, params)?;
        let map = self.det.draw(&pose, rgb.width, rgb.height);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some((pose, rgb.width, rgb.height));
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pose::Person;

    #[test]
    fn a_padded_detection_is_renormalised_to_the_cropped_map() {
        // detected on 192x128 (padded), the map cropped back to 150x100
        let pose = Pose {
            people: vec![Person {
                body: vec![Some((0.5, 0.25)), None],
                left_hand: vec![Some((0.25, 0.5))],
                ..Default::default()
            }],
            ..Default::default()
        };
        let p = reframe(pose, (192, 128), (150, 100));
        assert_eq!(p.people[0].body, vec![Some((0.64, 0.32)), None]);
        assert_eq!(p.people[0].left_hand, vec![Some((0.32, 0.64))]);
        assert_eq!((p.canvas_width, p.canvas_height), (Some(150), Some(100)));
    }

    #[test]
    fn every_openpose_preprocessor_is_a_pose_detector() {
        let names = pose_detector_names();
        for n in [
            "openpose",
            "openpose_face",
            "openpose_faceonly",
            "openpose_full",
            "openpose_hand",
        ] {
            assert!(names.iter().any(|m| m == n), "{n}: {names:?}");
            assert_eq!(pose_detector(n).unwrap().name(), n);
        }
        assert!(pose_detector("canny").is_none());
    }
}
