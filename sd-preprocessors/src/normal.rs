//! `normal_from_depth`: a normal map from a depth map, as ControlNet 1.0's "normal" /
//! the webui's `normal_midas` derive it (controlnet_aux `MidasDetector(depth_and_normal)`):
//! Sobel gradients of the depth, a constant z, background flattened, channels reversed.

use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

/// OpenCV's 3x3 Sobel on f32 with BORDER_REFLECT_101 (`cv2.Sobel(d, CV_32F, dx, dy, 3)`).
pub fn sobel3(d: &[f32], w: usize, h: usize, dx: bool) -> Vec<f32> {
    let r101 = |i: isize, n: usize| -> usize {
        if n == 1 {
            0
        } else if i < 0 {
            (-i) as usize
        } else if i as usize >= n {
            2 * n - 2 - i as usize
        } else {
            i as usize
        }
    };
    let (kx, ky): ([f32; 3], [f32; 3]) = if dx {
        ([-1.0, 0.0, 1.0], [1.0, 2.0, 1.0])
    } else {
        ([1.0, 2.0, 1.0], [-1.0, 0.0, 1.0])
    };
    // Row pass then column pass, as OpenCV's separable filter runs.
    let mut rows = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut s = 0f32;
            for (k, kv) in kx.iter().enumerate() {
                s += d[y * w + r101(x as isize + k as isize - 1, w)] * kv;
            }
            rows[y * w + x] = s;
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut s = 0f32;
            for (k, kv) in ky.iter().enumerate() {
                s += rows[r101(y as isize + k as isize - 1, h) * w + x] * kv;
            }
            out[y * w + x] = s;
        }
    }
    out
}

/// The normal map of `depth` (raw values, larger = nearer): `[z, y, x]` normalised to u8.
pub fn normal_from_depth(depth: &[f32], w: usize, h: usize, a: f32, bg_th: f32) -> Vec<u8> {
    let (lo, hi) = depth
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        });
    let range = hi - lo;
    let sx = sobel3(depth, w, h, true);
    let sy = sobel3(depth, w, h, false);
    let mut out = Vec::with_capacity(w * h * 3);
    for i in 0..w * h {
        // depth_pt = (d - min) / max(d - min); background where it is below the threshold.
        let dn = (depth[i] - lo) / range;
        let bg = dn < bg_th;
        let (x, y, z) = if bg { (0.0, 0.0, a) } else { (sx[i], sy[i], a) };
        let n = (x * x + y * y + z * z).sqrt();
        let q = |v: f32| (v / n * 127.5 + 127.5).clamp(0.0, 255.0) as u8;
        out.extend([q(z), q(y), q(x)]);
    }
    out
}

/// The parameters of a normal map from depth: `bg_threshold` (0.4) and `a` (2 pi).
pub(crate) fn normal_params() -> [ParamSpec; 2] {
    [
        ParamSpec::float(
            "bg_threshold",
            0.4,
            0.0,
            1.0,
            "depth (0..1 after min-max) below which a pixel is flat background",
        ),
        ParamSpec::float(
            "a",
            std::f64::consts::TAU,
            0.01,
            1000.0,
            "the constant z component; smaller makes slopes stronger",
        ),
    ]
}

/// `(a, bg_threshold)` as [`normal_params`] give them.
pub(crate) fn normal_settings(params: &Params) -> (f32, f32) {
    (
        params.float("a").unwrap_or(std::f64::consts::TAU) as f32,
        params.float("bg_threshold").unwrap_or(0.4) as f32,
    )
}

/// `normal_from_depth`: a depth image (grey, near = white) to a normal map.
pub struct NormalFromDepth;

impl Preprocessor for NormalFromDepth {
    fn name(&self) -> &str {
        "normal_from_depth"
    }
    fn description(&self) -> &str {
        "normal map from a depth map (near = white), ControlNet 1.0 normal / webui normal_midas"
    }
    fn params(&self) -> Vec<ParamSpec> {
        normal_params().to_vec()
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        // The depth image's grey value is the depth (the first channel of a grey map).
        let depth: Vec<f32> = rgb.data.chunks_exact(3).map(|p| p[0] as f32).collect();
        let (lo, hi) = depth
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        if hi <= lo {
            return Err(PluginError::failed(
                "normal_from_depth",
                "the depth map is flat (every pixel the same value)",
            ));
        }
        let (a, th) = normal_settings(params);
        Ok(ImageBuf {
            data: normal_from_depth(&depth, rgb.width, rgb.height, a, th),
            ..rgb
        })
    }
}

register_preprocessor!(NormalFromDepth);
