//! Resampling preprocessors (preprocessors.md section 4): `color` (T2I-Adapter colour grid),
//! `tile_resample`, `blur_gaussian`, and `shuffle` (seeded).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

use crate::cvresize::{resize, Interp};
use crate::lines::gaussian_blur_f32;

/// `color`: the image averaged into cells of 64 pixels (bicubic down to w/64 x h/64, nearest
/// back up), as sd-webui-controlnet's `apply_color` after its short-side resize.
pub struct Color;

impl Preprocessor for Color {
    fn name(&self) -> &str {
        "color"
    }
    fn description(&self) -> &str {
        "colour grid: 64-pixel cells of the image's colours (T2I-Adapter color)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    fn process(&self, input: &ImageBuf, _: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let (w, h) = (rgb.width, rgb.height);
        let small = resize(&rgb, (w / 64).max(1), (h / 64).max(1), Interp::Cubic);
        Ok(resize(&small, w, h, Interp::Nearest))
    }
}

/// `tile_resample`: shrink by `rate` with area averaging (identity below 1.1).
pub struct TileResample;

impl Preprocessor for TileResample {
    fn name(&self) -> &str {
        "tile_resample"
    }
    fn description(&self) -> &str {
        "down-sampled copy for tile ControlNets (area, by `rate`)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::float(
            "rate",
            1.0,
            1.0,
            8.0,
            "down-sampling rate; below 1.1 the image is unchanged",
        )]
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let r = params.float("rate").unwrap_or(1.0);
        if r < 1.1 {
            return Ok(rgb);
        }
        let w = ((rgb.width as f64 / r) as usize).max(1);
        let h = ((rgb.height as f64 / r) as usize).max(1);
        Ok(resize(&rgb, w, h, Interp::Area))
    }
}

/// `blur_gaussian`: `cv2.GaussianBlur(img, (0, 0), sigma)` on 8-bit RGB (kernel size
/// `round(sigma * 6 + 1) | 1`, reflected borders), within one level of OpenCV's fixed-point
/// path.
pub struct BlurGaussian;

impl Preprocessor for BlurGaussian {
    fn name(&self) -> &str {
        "blur_gaussian"
    }
    fn description(&self) -> &str {
        "Gaussian blur (for blur/tile ControlNets)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::float("sigma", 9.0, 0.01, 64.0, "blur sigma")]
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let sigma = params.float("sigma").unwrap_or(9.0);
        let x: Vec<f32> = rgb.data.iter().map(|&v| v as f32).collect();
        // 8-bit images get a 3-sigma kernel in OpenCV (4-sigma for float ones)
        let out = gaussian_blur_sized(&x, rgb.width, rgb.height, 3, sigma, 3.0);
        Ok(ImageBuf {
            data: out
                .into_iter()
                .map(|v| v.round().clamp(0.0, 255.0) as u8)
                .collect(),
            ..rgb
        })
    }
}

fn gaussian_blur_sized(x: &[f32], w: usize, h: usize, c: usize, sigma: f64, span: f64) -> Vec<f32> {
    // gaussian_blur_f32 uses the float-image kernel size (4 sigma); an 8-bit kernel of
    // round(6 sigma + 1) | 1 taps is the same Gaussian truncated earlier: emulate with a
    // sigma-scaled call when the sizes differ
    if span == 4.0 {
        return gaussian_blur_f32(x, w, h, c, sigma);
    }
    crate::lines::gaussian_blur_taps(
        x,
        w,
        h,
        c,
        sigma,
        (((sigma * span * 2.0 + 1.0).round()) as usize) | 1,
    )
}

/// `shuffle`: the image warped by a smooth random flow (sd-webui-controlnet's content
/// shuffle), seeded. Statistically what the reference does; its numpy random stream is not
/// reproduced.
pub struct Shuffle;

impl Preprocessor for Shuffle {
    fn name(&self) -> &str {
        "shuffle"
    }
    fn description(&self) -> &str {
        "content shuffle: the image warped by a random smooth flow (seeded)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::int("seed", 0, 0, i64::MAX, "random seed")]
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let (w, h) = (rgb.width, rgb.height);
        let mut rng = StdRng::seed_from_u64(params.int("seed").unwrap_or(0) as u64);
        // make_noise_disk(h, w, 1, 256): uniform noise on a coarse grid, bicubic up, min-max
        let disk = |rng: &mut StdRng| -> Vec<f32> {
            let f = 256usize;
            let (gw, gh) = (w / f + 2, h / f + 2);
            let grid: Vec<u8> = (0..gw * gh).map(|_| rng.random::<u8>()).collect();
            let g = ImageBuf {
                width: gw,
                height: gh,
                channels: 1,
                data: grid,
            };
            let up = resize(&g, w + 2 * f, h + 2 * f, Interp::Cubic);
            let mut v: Vec<f32> = (0..h)
                .flat_map(|y| (0..w).map(move |x| (y, x)))
                .map(|(y, x)| up.data[(y + f) * up.width + x + f] as f32)
                .collect();
            let (lo, hi) = v
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let span = (hi - lo).max(1e-6);
            v.iter_mut().for_each(|x| *x = (*x - lo) / span);
            v
        };
        let fx: Vec<f32> = disk(&mut rng)
            .into_iter()
            .map(|v| v * (w - 1) as f32)
            .collect();
        let fy: Vec<f32> = disk(&mut rng)
            .into_iter()
            .map(|v| v * (h - 1) as f32)
            .collect();
        // cv2.remap with bilinear interpolation
        let mut data = Vec::with_capacity(w * h * 3);
        for i in 0..w * h {
            let (x, y) = (fx[i], fy[i]);
            let (x0, y0) = (x.floor() as usize, y.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
            let (ax, ay) = (x - x0 as f32, y - y0 as f32);
            for ch in 0..3 {
                let p = |xx: usize, yy: usize| rgb.data[(yy * w + xx) * 3 + ch] as f32;
                let top = p(x0, y0) * (1.0 - ax) + p(x1, y0) * ax;
                let bottom = p(x0, y1) * (1.0 - ax) + p(x1, y1) * ax;
                data.push((top * (1.0 - ay) + bottom * ay).round().clamp(0.0, 255.0) as u8);
            }
        }
        Ok(ImageBuf { data, ..rgb })
    }
}

register_preprocessor!(Color);
register_preprocessor!(TileResample);
register_preprocessor!(BlurGaussian);
register_preprocessor!(Shuffle);
