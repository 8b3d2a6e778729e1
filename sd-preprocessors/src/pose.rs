//! OpenPose skeletons: the keypoint JSON format pose editors exchange, and drawing identical
//! to controlnet_aux's `draw_bodypose` / `draw_facepose` (OpenCV's integer drawing, see
//! `draw.rs`).

use serde_json::{json, Value};

use crate::draw::{ellipse2poly, fill_circle, fill_convex_poly, thick_line, Canvas};

/// The 17 limbs of the 18-point COCO body, as 1-based keypoint pairs.
const LIMBS: [(usize, usize); 17] = [
    (2, 3),
    (2, 6),
    (3, 4),
    (4, 5),
    (6, 7),
    (7, 8),
    (2, 9),
    (9, 10),
    (10, 11),
    (2, 12),
    (12, 13),
    (13, 14),
    (2, 1),
    (1, 15),
    (15, 17),
    (1, 16),
    (16, 18),
];

const COLORS: [[u8; 3]; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

/// A keypoint; `None` when missing.
pub type Keypoint = Option<(f64, f64)>;

/// One person.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Person {
    pub body: Vec<Keypoint>,
    pub face: Vec<Keypoint>,
    pub left_hand: Vec<Keypoint>,
    pub right_hand: Vec<Keypoint>,
}

/// A pose file: people and the canvas they were placed on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pose {
    pub people: Vec<Person>,
    pub canvas_width: Option<usize>,
    pub canvas_height: Option<usize>,
}

fn points(v: &Value, key: &str) -> Result<Vec<Keypoint>, String> {
    // absent, or null as sd-webui-controlnet's encode_poses_as_json writes a missing part
    let Some(a) = v.get(key).filter(|a| !a.is_null()) else {
        return Ok(Vec::new());
    };
    let a = a.as_array().ok_or(format!("`{key}` is not a list"))?;
    if a.len() % 3 != 0 {
        return Err(format!(
            "`{key}` has {} numbers, not x, y, confidence triples",
            a.len()
        ));
    }
    a.chunks(3)
        .map(|t| {
            let n = |x: &Value| x.as_f64().ok_or(format!("`{key}` holds a non-number"));
            let (x, y, c) = (n(&t[0])?, n(&t[1])?, n(&t[2])?);
            // missing points are written as 0, 0, 0 (or with confidence 0)
            Ok((c > 0.0 && !(x == 0.0 && y == 0.0 && c == 0.0)).then_some((x, y)))
        })
        .collect()
}

impl Pose {
    /// [`Pose::from_json`] of a file; errors name nothing but the problem (callers add the path).
    /// Only regular files are read (`/dev/zero`, FIFOs and folders are refused at once).
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = sd_plugins_api::input_file::read_to_string(path)?;
        Self::from_json(&text)
    }

    /// Read the OpenPose keypoint JSON (`people[].pose_keypoints_2d`, `face_keypoints_2d`,
    /// `hand_left_keypoints_2d`, `hand_right_keypoints_2d`, `canvas_width/height`); a list of
    /// such objects (one per frame) gives its first.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let v = match &v {
            Value::Array(a) => a.first().cloned().ok_or("an empty list")?,
            o => o.clone(),
        };
        let people = v
            .get("people")
            .and_then(|p| p.as_array())
            .ok_or("no `people` list")?
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let err = |e: String| format!("people[{i}]: {e}");
                Ok(Person {
                    body: points(p, "pose_keypoints_2d").map_err(err)?,
                    face: points(p, "face_keypoints_2d").map_err(err)?,
                    left_hand: points(p, "hand_left_keypoints_2d").map_err(err)?,
                    right_hand: points(p, "hand_right_keypoints_2d").map_err(err)?,
                })
            })
            .collect::<Result<_, String>>()?;
        // absent or null: no canvas; anything but a whole number of pixels >= 1 is an error
        let dim = |k: &str| -> Result<Option<usize>, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .or_else(|| {
                        x.as_f64()
                            .filter(|f| f.fract() == 0.0 && *f >= 1.0)
                            .map(|f| f as u64)
                    })
                    .filter(|&n| n >= 1)
                    .map(|n| Some(usize::try_from(n).unwrap_or(usize::MAX)))
                    .ok_or_else(|| {
                        format!("`{k}` = {x}: expected a whole number of pixels, at least 1")
                    }),
            }
        };
        Ok(Pose {
            people,
            canvas_width: dim("canvas_width")?,
            canvas_height: dim("canvas_height")?,
        })
    }

    /// Write the same format (missing points as 0, 0, 0).
    pub fn to_json(&self) -> Value {
        let flat = |ps: &[Keypoint]| -> Vec<f64> {
            ps.iter()
                .flat_map(|p| match p {
                    Some((x, y)) => [*x, *y, 1.0],
                    None => [0.0, 0.0, 0.0],
                })
                .collect()
        };
        let people: Vec<Value> = self
            .people
            .iter()
            .map(|p| {
                json!({
                    "pose_keypoints_2d": flat(&p.body),
                    "face_keypoints_2d": flat(&p.face),
                    "hand_left_keypoints_2d": flat(&p.left_hand),
                    "hand_right_keypoints_2d": flat(&p.right_hand),
                })
            })
            .collect();
        let mut v = json!({ "people": people });
        if let (Some(w), Some(h)) = (self.canvas_width, self.canvas_height) {
            v["canvas_width"] = w.into();
            v["canvas_height"] = h.into();
        }
        v
    }
}

/// The largest side of a pose canvas.
pub const MAX_CANVAS_SIDE: usize = 16384;

/// Peak bytes per canvas pixel: the RGB canvas, and its float copy when it is a control image.
pub fn canvas_cost() -> sd_plugins_api::memory::Cost {
    sd_plugins_api::memory::Cost {
        per_pixel: 16.0,
        fixed: 0,
        peak: "the RGB canvas and its float copy".into(),
    }
}

/// A canvas size any pose may be drawn on: sides 1..=[`MAX_CANVAS_SIDE`], and the canvas
/// within the memory available (`sd_plugins_api::memory`). Checked before drawing.
pub fn check_canvas(width: usize, height: usize) -> Result<(), String> {
    if !(1..=MAX_CANVAS_SIDE).contains(&width) || !(1..=MAX_CANVAS_SIDE).contains(&height) {
        return Err(format!(
            "canvas {width}x{height}: sides must be 1..={MAX_CANVAS_SIDE}"
        ));
    }
    sd_plugins_api::memory::check("pose canvas", width, height, 1, 1, &canvas_cost())
}

impl Pose {
    /// The canvas to draw on: `width` / `height` if given, else the file's, else `default`;
    /// checked by [`check_canvas`].
    pub fn canvas(
        &self,
        width: Option<usize>,
        height: Option<usize>,
        default: (usize, usize),
    ) -> Result<(usize, usize), String> {
        let w = width.or(self.canvas_width).unwrap_or(default.0);
        let h = height.or(self.canvas_height).unwrap_or(default.1);
        check_canvas(w, h)?;
        Ok((w, h))
    }
}

/// Keypoints beyond this many pixels are drawn at it: far outside any canvas, so a point
/// at 1e10 or 1e308 costs no more than one just off the canvas (the drawing clips exactly).
const FAR: f64 = (1u64 << 24) as f64;

/// A keypoint's pixel coordinate, clamped to [`FAR`].
fn px(v: f64) -> f64 {
    v.clamp(-FAR, FAR)
}

/// Non-finite coordinates count as missing points: controlnet_aux skips missing keypoints,
/// and a NaN or infinite one has no place to be drawn.
fn finite(points: &[Keypoint]) -> Vec<Keypoint> {
    points
        .iter()
        .map(|k| k.filter(|(x, y)| x.is_finite() && y.is_finite()))
        .collect()
}

/// controlnet_aux `is_normalized`: every present point within [0, 1] (then they scale by the
/// canvas; otherwise they are pixels).
fn scale(points: &[Keypoint], w: usize, h: usize) -> (f64, f64) {
    let present: Vec<&(f64, f64)> = points.iter().flatten().collect();
    if !present.is_empty()
        && present
            .iter()
            .all(|(x, y)| x.abs() <= 1.0 && y.abs() <= 1.0)
    {
        (w as f64, h as f64)
    } else {
        (1.0, 1.0)
    }
}

/// controlnet_aux `draw_bodypose`: limbs as filled ellipses in 60% colour, then joints.
pub fn draw_body(c: &mut Canvas, body: &[Keypoint]) {
    let body = &finite(body)[..];
    let (w, h) = scale(body, c.width, c.height);
    let get = |i: usize| body.get(i).copied().flatten();
    for (i, &(a, b)) in LIMBS.iter().enumerate() {
        let (Some(k1), Some(k2)) = (get(a - 1), get(b - 1)) else {
            continue;
        };
        let (y0, y1) = (px(k1.0 * w), px(k2.0 * w));
        let (x0, x1) = (px(k1.1 * h), px(k2.1 * h));
        let (mx, my) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
        let length = ((x0 - x1).powi(2) + (y0 - y1).powi(2)).sqrt();
        let angle = (x0 - x1).atan2(y0 - y1).to_degrees();
        let poly = ellipse2poly(
            (my as i64, mx as i64),
            ((length / 2.0) as i64, 4),
            angle as i32,
            0,
            360,
            1,
        );
        let col = COLORS[i].map(|v| (v as f64 * 0.6) as u8);
        fill_convex_poly(c, &poly, col);
    }
    for (i, p) in body.iter().take(18).enumerate() {
        if let Some((x, y)) = p {
            fill_circle(c, (px(x * w) as i64, px(y * h) as i64), 4, COLORS[i]);
        }
    }
}

/// controlnet_aux `draw_facepose`: white dots of radius 3 (points at the origin skipped).
pub fn draw_face(c: &mut Canvas, face: &[Keypoint]) {
    let face = &finite(face)[..];
    let (w, h) = scale(face, c.width, c.height);
    for (x, y) in face.iter().flatten() {
        let (x, y) = (px(x * w) as i64, px(y * h) as i64);
        if x as f64 > 0.01 && y as f64 > 0.01 {
            fill_circle(c, (x, y), 3, [255, 255, 255]);
        }
    }
}

/// matplotlib's `hsv_to_rgb([h, 1, 1]) * 255`, rounded as OpenCV rounds colour scalars.
fn hue(h: f64) -> [u8; 3] {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let (v, p, q, t) = (1.0, 0.0, 1.0 - f, f);
    let (r, g, b) = match (i as i64).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [r, g, b].map(|x: f64| (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
}

const HAND_EDGES: [(usize, usize); 20] = [
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (0, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (0, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
];

/// controlnet_aux `draw_handpose`: bones as 2-pixel lines in rainbow colours, joints as blue
/// dots (points at the origin skipped).
pub fn draw_hand(c: &mut Canvas, hand: &[Keypoint]) {
    let hand = &finite(hand)[..];
    let (w, h) = scale(hand, c.width, c.height);
    let pos = |k: Keypoint| k.map(|(x, y)| (px(x * w) as i64, px(y * h) as i64));
    for (ie, &(a, b)) in HAND_EDGES.iter().enumerate() {
        let (Some(p1), Some(p2)) = (
            pos(hand.get(a).copied().flatten()),
            pos(hand.get(b).copied().flatten()),
        ) else {
            continue;
        };
        if p1.0 > 0 && p1.1 > 0 && p2.0 > 0 && p2.1 > 0 {
            thick_line(c, p1, p2, hue(ie as f64 / HAND_EDGES.len() as f64), 2);
        }
    }
    for p in hand.iter().filter_map(|k| pos(*k)) {
        if p.0 > 0 && p.1 > 0 {
            fill_circle(c, p, 4, [0, 0, 255]);
        }
    }
}

/// Draw every person of a pose on a black canvas (controlnet_aux `draw_poses`: per person,
/// the body, the hands, then the face).
pub fn render(pose: &Pose, width: usize, height: usize) -> Canvas {
    let mut c = Canvas::new(width, height);
    for p in &pose.people {
        if !p.body.is_empty() {
            draw_body(&mut c, &p.body);
        }
        for hand in [&p.left_hand, &p.right_hand] {
            if !hand.is_empty() {
                draw_hand(&mut c, hand);
            }
        }
        if !p.face.is_empty() {
            draw_face(&mut c, &p.face);
        }
    }
    c
}

/// A keypoint file drawn whole on its canvas (`canvas_width` / `canvas_height`, else `size`),
/// as the pose preprocessors draw a `PoseFile` input. Errors name the problem, not the file.
pub fn render_file(
    path: &std::path::Path,
    size: (usize, usize),
) -> Result<sd_plugins_api::ImageBuf, String> {
    let pose = Pose::from_file(path)?;
    let (w, h) = pose.canvas(None, None, size)?;
    let c = render(&pose, w, h);
    Ok(sd_plugins_api::ImageBuf {
        width: c.width,
        height: c.height,
        channels: 3,
        data: c.data,
    })
}
