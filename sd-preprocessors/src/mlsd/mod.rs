//! `mlsd`: straight line segments by M-LSD (controlnet_aux 0.0.10 `MLSDdetector`, the same
//! code and defaults as sd-webui-controlnet's `mlsd` module: value threshold 0.1, distance
//! threshold 0.1, resolution 512), drawn white, 1 px, on black.
//!
//! `pred_lines` on the image at its own size: the RGB pixels plus a constant channel of ones,
//! `/127.5 - 1` (f32), through [`MlsdNet`] to the TP map at half size; sigmoid of the centre
//! logits, kept where they equal their 3x3 max-pool (padded with -inf), the 200 largest; a
//! centre becomes a line when its score > value threshold and the distance between its start
//! and end displacements > distance threshold (both compared in f32, as numpy compares an f32
//! with a Python float); the line is centre + displacements (f64), x2. Each coordinate is
//! truncated toward zero (`int()`) and drawn with `cv2.line(..., 1)` ([`cv_line`]), strongest
//! first. Where the reference raises inside its `try` (a side the network cannot take — not
//! 16k or 16k+1 —, fewer than 200 map cells, a coordinate that is not finite or not an int32),
//! it keeps what was drawn so far, so this does the same: a black map, or the lines before.

pub mod net;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Device, Tensor};
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use crate::draw::{cv_line, Canvas};
pub use net::{output_side, MlsdNet};

const NAME: &str = "mlsd";
/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["mlsd_large_512_fp32.pth", "mlsd_large_512_fp32.safetensors"];
/// The reference's `topk_n`.
pub const TOP_K: usize = 200;

/// What gives the TP map for a `[1, 4, H, W]` input: `[1, C >= 5, H/2, W/2]` (centre logits,
/// then start x, start y, end x, end y displacements in map cells). [`MlsdNet`], or canned
/// outputs where a test replaces the network as the reference's `model` can be replaced.
pub trait LineNetwork {
    fn tp_map(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

impl LineNetwork for MlsdNet {
    fn tp_map(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x)
    }
}

/// `pred_lines`' network input for an RGB image: `[1, 4, H, W]`, the colours and a channel of
/// ones, each `v / 127.5 - 1` in f32.
pub fn network_input(rgb: &ImageBuf) -> candle_core::Result<Tensor> {
    let (w, h) = (rgb.width, rgb.height);
    let norm = |v: f32| v / 127.5 - 1.0;
    let mut x = vec![norm(1.0); 4 * w * h];
    for (i, p) in rgb.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            x[c * w * h + i] = norm(p[c] as f32);
        }
    }
    Tensor::from_vec(x, (1, 4, h, w), &Device::Cpu)
}

/// The reference's `deccode_output_score_and_ptss(tp, 200, 3)` and line selection on a TP map
/// (`tp`: at least 5 planes of `h x w`, CHW): the lines `[x1, y1, x2, y2]` in image pixels,
/// strongest centre first (equal scores by position, row-major). `None` where the reference
/// fails: fewer than 200 cells.
pub fn decode(tp: &[f32], w: usize, h: usize, thr_v: f64, thr_d: f64) -> Option<Vec<[f64; 4]>> {
    let n = w * h;
    if n < TOP_K || tp.len() < 5 * n {
        return None;
    }
    let heat: Vec<f32> = tp[..n].iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
    // 3x3 max-pool, stride 1, -inf padding; keep the cells equal to it
    let mut kept = vec![0f32; n];
    for y in 0..h {
        for x in 0..w {
            let v = heat[y * w + x];
            let mut m = f32::NEG_INFINITY;
            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                    let u = heat[yy * w + xx];
                    // torch's max_pool2d propagates NaN
                    if u > m || u.is_nan() {
                        m = u;
                    }
                }
            }
            kept[y * w + x] = v * if m == v { 1.0 } else { 0.0 };
        }
    }
    // torch.topk(sorted): the 200 largest, largest first (ties, which torch leaves unordered,
    // by position)
    let mut order: Vec<usize> = (0..n).collect();
    let key = |i: &usize| (std::cmp::Reverse(kept[*i].total_cmp_key()), *i);
    order.select_nth_unstable_by_key(TOP_K - 1, key);
    order.truncate(TOP_K);
    order.sort_unstable_by_key(key);
    let (tv, td) = (thr_v as f32, thr_d as f32);
    let plane = |k: usize, i: usize| tp[k * n + i];
    let mut lines = Vec::new();
    for i in order {
        let (y, x) = (i / w, i % w);
        let (sx, sy, ex, ey) = (plane(1, i), plane(2, i), plane(3, i), plane(4, i));
        let (dx, dy) = (sx - ex, sy - ey);
        let dist = (dx * dx + dy * dy).sqrt();
        if kept[i] > tv && dist > td {
            let (x, y) = (x as f64, y as f64);
            lines.push([
                2.0 * (x + sx as f64),
                2.0 * (y + sy as f64),
                2.0 * (x + ex as f64),
                2.0 * (y + ey as f64),
            ]);
        }
    }
    Some(lines)
}

/// An f32's place in `total_cmp` order as an integer (for sort keys).
trait TotalKey {
    fn total_cmp_key(self) -> i32;
}

impl TotalKey for f32 {
    fn total_cmp_key(self) -> i32 {
        let b = self.to_bits() as i32;
        b ^ ((((b >> 31) as u32) >> 1) as i32)
    }
}

/// The lines of an RGB image (`pred_lines`); `None` where the reference fails (the network
/// cannot take the size, or its map has fewer than 200 cells).
pub fn pred_lines(
    net: &dyn LineNetwork,
    rgb: &ImageBuf,
    thr_v: f64,
    thr_d: f64,
) -> Result<Option<Vec<[f64; 4]>>, String> {
    let (w, h) = (rgb.width, rgb.height);
    let (Some(ow), Some(oh)) = (output_side(w), output_side(h)) else {
        return Ok(None);
    };
    let run = || -> candle_core::Result<Vec<f32>> {
        let x = network_input(rgb)?;
        let tp = net.tp_map(&x)?.to_device(&Device::Cpu)?;
        let (n, c, th, tw) = tp.dims4()?;
        if n != 1 || c < 5 || (th, tw) != (oh, ow) {
            candle_core::bail!(
                "the network gave a map of {:?}, expected [1, >=5, {oh}, {ow}]",
                tp.dims()
            );
        }
        tp.narrow(1, 0, 5)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let tp = run().map_err(|e| e.to_string())?;
    Ok(decode(&tp, ow, oh, thr_v, thr_d))
}

/// The lines drawn as the reference draws them: `int()` of each coordinate, `cv2.line` white,
/// 1 px, on a black `w x h` RGB canvas, in order; a coordinate cv2 refuses (not finite, or
/// outside int32) ends the drawing there.
pub fn draw_lines(lines: &[[f64; 4]], w: usize, h: usize) -> Canvas {
    let mut c = Canvas::new(w, h);
    let as_i32 = |v: f64| {
        let t = v.trunc();
        (t.is_finite() && t >= i32::MIN as f64 && t <= i32::MAX as f64).then_some(t as i32)
    };
    for l in lines {
        let [Some(x1), Some(y1), Some(x2), Some(y2)] = l.map(as_i32) else {
            break;
        };
        cv_line(&mut c, (x1, y1), (x2, y2), [255, 255, 255]);
    }
    c
}

/// What the `mlsd` preprocessor makes of an image (any channel count) at its own size.
pub fn mlsd_map(
    net: &dyn LineNetwork,
    input: &ImageBuf,
    thr_v: f64,
    thr_d: f64,
) -> Result<ImageBuf, String> {
    let rgb = hwc3(input);
    let lines = pred_lines(net, &rgb, thr_v, thr_d)?.unwrap_or_default();
    let c = draw_lines(&lines, rgb.width, rgb.height);
    Ok(ImageBuf {
        width: c.width,
        height: c.height,
        channels: 3,
        data: c.data,
    })
}

fn model_cache() -> &'static Mutex<HashMap<PathBuf, Arc<MlsdNet>>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<MlsdNet>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The network at `path`, loaded once per process.
pub fn load_cached(path: &Path) -> Result<Arc<MlsdNet>, String> {
    let mut cache = model_cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = cache.get(path) {
        return Ok(n.clone());
    }
    let n = Arc::new(MlsdNet::load(path, &Device::Cpu)?);
    cache.insert(path.to_path_buf(), n.clone());
    Ok(n)
}

/// `mlsd`: M-LSD large and controlnet_aux's line drawing.
pub struct Mlsd;

impl Preprocessor for Mlsd {
    fn name(&self) -> &str {
        NAME
    }
    fn description(&self) -> &str {
        "M-LSD straight lines (MobileV2_MLSD_Large, mlsd_large_512_fp32.pth), white 1-px \
         lines on black; controlnet_aux 0.0.10 MLSDdetector = sd-webui-controlnet mlsd"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::float(
                "value_threshold",
                0.1,
                0.01,
                2.0,
                "minimum centre score (sigmoid) of a line",
            ),
            ParamSpec::float(
                "distance_threshold",
                0.1,
                0.01,
                20.0,
                "minimum length of a line, in half-resolution map cells",
            ),
            ParamSpec::string(
                "model",
                "",
                "mlsd_large_512_fp32.pth or .safetensors; empty: looked for in the annotator \
                 folder",
            ),
        ]
    }
    fn cache_salt(&self, params: &Params) -> Result<String, PluginError> {
        crate::weights::weights_salt(NAME, params, &WEIGHT_FILES)
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let thr_v = params.float("value_threshold").unwrap_or(0.1);
        let thr_d = params.float("distance_threshold").unwrap_or(0.1);
        let path = crate::weights::find_weights(NAME, params, &WEIGHT_FILES)?;
        let net = load_cached(&path).map_err(|e| PluginError::failed(NAME, e))?;
        mlsd_map(net.as_ref(), input, thr_v, thr_d).map_err(|e| PluginError::failed(NAME, e))
    }
}

register_preprocessor!(Mlsd);
