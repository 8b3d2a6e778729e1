//! Line preprocessors built on a float Gaussian blur: `scribble_xdog` and
//! `lineart_standard` (preprocessors.md section 4), and `binary` (Otsu or a fixed threshold).

use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

/// `cv2.GaussianBlur(img_f32, (0, 0), sigma)`: kernel size `round(sigma * 8 + 1) | 1`, taps
/// from `getGaussianKernel` (computed in double, stored as float), separable, borders
/// reflected without repeating the edge (BORDER_REFLECT_101). Interleaved channels.
pub fn gaussian_blur_f32(data: &[f32], w: usize, h: usize, c: usize, sigma: f64) -> Vec<f32> {
    gaussian_blur_taps(
        data,
        w,
        h,
        c,
        sigma,
        (((sigma * 8.0 + 1.0).round()) as usize) | 1,
    )
}

/// The same blur with an explicit (odd) number of taps.
pub fn gaussian_blur_taps(
    data: &[f32],
    w: usize,
    h: usize,
    c: usize,
    sigma: f64,
    n: usize,
) -> Vec<f32> {
    let r = n / 2;
    let s2 = -0.5 / (sigma * sigma);
    let raw: Vec<f64> = (0..n)
        .map(|i| {
            let x = i as f64 - (n as f64 - 1.0) * 0.5;
            (s2 * x * x).exp()
        })
        .collect();
    let sum: f64 = raw.iter().sum();
    let k: Vec<f32> = raw.iter().map(|v| (v / sum) as f32).collect();
    let reflect = |i: isize, len: usize| -> usize {
        let len = len as isize;
        if len == 1 {
            return 0;
        }
        let mut i = i;
        while i < 0 || i >= len {
            if i < 0 {
                i = -i;
            }
            if i >= len {
                i = 2 * (len - 1) - i;
            }
        }
        i as usize
    };
    let mut tmp = vec![0f32; data.len()];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let mut acc = 0f32;
                for (t, kv) in k.iter().enumerate() {
                    let sx = reflect(x as isize + t as isize - r as isize, w);
                    acc += data[(y * w + sx) * c + ch] * kv;
                }
                tmp[(y * w + x) * c + ch] = acc;
            }
        }
    }
    let mut out = vec![0f32; data.len()];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let mut acc = 0f32;
                for (t, kv) in k.iter().enumerate() {
                    let sy = reflect(y as isize + t as isize - r as isize, h);
                    acc += tmp[(sy * w + x) * c + ch] * kv;
                }
                out[(y * w + x) * c + ch] = acc;
            }
        }
    }
    out
}

fn grey_map(w: usize, h: usize, v: Vec<u8>) -> ImageBuf {
    hwc3(&ImageBuf {
        width: w,
        height: h,
        channels: 1,
        data: v,
    })
}

/// Per pixel, the minimum over channels of `a - b`.
fn min_channel_diff(a: &[f32], b: &[f32], c: usize) -> Vec<f32> {
    a.chunks(c)
        .zip(b.chunks(c))
        .map(|(p, q)| {
            p.iter()
                .zip(q)
                .map(|(x, y)| x - y)
                .fold(f32::INFINITY, f32::min)
        })
        .collect()
}

/// `scribble_xdog`: difference of Gaussians (sigma 0.5 and 5), thresholded.
pub struct ScribbleXdog;

impl Preprocessor for ScribbleXdog {
    fn name(&self) -> &str {
        "scribble_xdog"
    }
    fn description(&self) -> &str {
        "scribble lines from a difference of Gaussians (sd-webui-controlnet's xdog)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::int(
            "threshold",
            32,
            1,
            64,
            "lower keeps more lines",
        )]
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let (w, h) = (rgb.width, rgb.height);
        let x: Vec<f32> = rgb.data.iter().map(|&v| v as f32).collect();
        let g1 = gaussian_blur_f32(&x, w, h, 3, 0.5);
        let g2 = gaussian_blur_f32(&x, w, h, 3, 5.0);
        let t = params.int("threshold").unwrap_or(32) as f32;
        let out = min_channel_diff(&g2, &g1, 3)
            .into_iter()
            .map(|d| {
                let dog = (255.0 - d).clamp(0.0, 255.0);
                if 2.0 * (255.0 - dog) > t {
                    255
                } else {
                    0
                }
            })
            .collect();
        Ok(grey_map(w, h, out))
    }
}

/// `lineart_standard`: dark lines against a blurred copy (controlnet_aux LineartStandardDetector).
pub struct LineartStandard;

impl Preprocessor for LineartStandard {
    fn name(&self) -> &str {
        "lineart_standard"
    }
    fn description(&self) -> &str {
        "line art from the difference to a Gaussian blur, normalised by its median"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::float("sigma", 6.0, 0.5, 20.0, "Gaussian sigma"),
            ParamSpec::float(
                "intensity_threshold",
                8.0,
                0.0,
                255.0,
                "pixels above it set the median",
            ),
        ]
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let (w, h) = (rgb.width, rgb.height);
        let x: Vec<f32> = rgb.data.iter().map(|&v| v as f32).collect();
        let g = gaussian_blur_f32(&x, w, h, 3, params.float("sigma").unwrap_or(6.0));
        let mut i: Vec<f32> = min_channel_diff(&g, &x, 3)
            .into_iter()
            .map(|v| v.clamp(0.0, 255.0))
            .collect();
        let th = params.float("intensity_threshold").unwrap_or(8.0) as f32;
        let mut above: Vec<f32> = i.iter().copied().filter(|&v| v > th).collect();
        // numpy's median: the mean of the two middle values for an even count (nan if empty,
        // which max(16, nan) turns into 16)
        let median = if above.is_empty() {
            f32::NAN
        } else {
            above.sort_by(|a, b| a.total_cmp(b));
            let n = above.len();
            if n % 2 == 1 {
                above[n / 2]
            } else {
                ((above[n / 2 - 1] as f64 + above[n / 2] as f64) / 2.0) as f32
            }
        };
        let d = if median.is_nan() {
            16.0
        } else {
            median.max(16.0)
        };
        for v in i.iter_mut() {
            *v = (*v / d) * 127.0;
        }
        let out = i.into_iter().map(|v| v.clamp(0.0, 255.0) as u8).collect();
        Ok(grey_map(w, h, out))
    }
}

/// OpenCV 5's grey: `(9798 R + 19235 G + 3735 B + 16384) >> 15`.
pub fn grey(rgb: &ImageBuf) -> Vec<u8> {
    rgb.data
        .chunks(3)
        .map(|p| {
            ((9798 * p[0] as u32 + 19235 * p[1] as u32 + 3735 * p[2] as u32 + 16384) >> 15) as u8
        })
        .collect()
}

/// Otsu's threshold as `cv2.threshold(..., THRESH_OTSU)` computes it.
pub fn otsu(grey: &[u8]) -> u8 {
    let mut hist = [0f64; 256];
    for &g in grey {
        hist[g as usize] += 1.0;
    }
    let n = grey.len() as f64;
    let scale = 1.0 / n;
    let mu: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &h)| i as f64 * h * scale)
        .sum();
    let (mut mu1, mut q1) = (0f64, 0f64);
    let (mut max_sigma, mut max_val) = (0f64, 0u8);
    for (i, &h) in hist.iter().enumerate() {
        let p_i = h * scale;
        mu1 *= q1;
        q1 += p_i;
        let q2 = 1.0 - q1;
        if q1.min(q2) < f64::EPSILON || q1.max(q2) > 1.0 - f64::EPSILON {
            continue;
        }
        mu1 = (mu1 + i as f64 * p_i) / q1;
        let mu2 = (mu - q1 * mu1) / q2;
        let sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2);
        if sigma > max_sigma {
            max_sigma = sigma;
            max_val = i as u8;
        }
    }
    max_val
}

/// `binary` (sd-webui-controlnet): white where the grey value is at most the threshold
/// (THRESH_BINARY_INV); threshold 0 or 255 means Otsu's.
pub struct Binary;

impl Preprocessor for Binary {
    fn name(&self) -> &str {
        "binary"
    }
    fn description(&self) -> &str {
        "black-and-white by a grey threshold (0 or 255: Otsu's), dark parts white"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::int("threshold", 0, 0, 255, "0 or 255 = Otsu")]
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let g = grey(&rgb);
        let t = params.int("threshold").unwrap_or(0);
        let t = if t == 0 || t == 255 {
            otsu(&g)
        } else {
            t as u8
        };
        let out = g.into_iter().map(|v| if v > t { 0 } else { 255 }).collect();
        Ok(grey_map(rgb.width, rgb.height, out))
    }
}

register_preprocessor!(ScribbleXdog);
register_preprocessor!(LineartStandard);
register_preprocessor!(Binary);
