//! `canny`: `cv2.Canny(rgb, low, high)` exactly (OpenCV's generic path for 3-channel input,
//! L1 gradient): per-channel 3x3 Sobel with replicated borders, the channel of largest
//! |dx| + |dy| per pixel, non-maximum suppression with OpenCV's integer tangent test, and
//! 8-connected hysteresis. imageproc's canny (grey, blurred, L2, 6-neighbour) differs; see
//! shared/reference/preprocessors.md section 1.

use sd_plugins_api::{
    hwc3, register_preprocessor, ImageBuf, ParamSpec, Params, PluginError, Preprocessor,
};

/// Canny edges of an 8-bit image (any channel count; RGB as ControlNet passes it). Returns a
/// one-channel map, 255 on edges.
pub fn canny(img: &ImageBuf, low: f64, high: f64) -> Vec<u8> {
    let (w, h, c) = (img.width, img.height, img.channels);
    let (mut lo, mut hi) = (low.floor() as i32, high.floor() as i32);
    if lo > hi {
        std::mem::swap(&mut lo, &mut hi);
    }
    let px = |x: isize, y: isize, ch: usize| -> i32 {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        img.data[(y * w + x) * c + ch] as i32
    };
    // per pixel: the (mag, dx, dy) of the channel with the largest L1 magnitude
    let mut mag = vec![0i32; (w + 2) * (h + 2)];
    let mut dxs = vec![0i32; w * h];
    let mut dys = vec![0i32; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let mut best = (-1i32, 0i32, 0i32);
            for ch in 0..c {
                let p = |dx: isize, dy: isize| px(x + dx, y + dy, ch);
                let dx = (p(1, -1) + 2 * p(1, 0) + p(1, 1)) - (p(-1, -1) + 2 * p(-1, 0) + p(-1, 1));
                let dy = (p(-1, 1) + 2 * p(0, 1) + p(1, 1)) - (p(-1, -1) + 2 * p(0, -1) + p(1, -1));
                let m = dx.abs() + dy.abs();
                if m > best.0 {
                    best = (m, dx, dy);
                }
            }
            let (x, y) = (x as usize, y as usize);
            mag[(y + 1) * (w + 2) + x + 1] = best.0;
            dxs[y * w + x] = best.1;
            dys[y * w + x] = best.2;
        }
    }
    let m_at = |x: isize, y: isize| mag[((y + 1) as usize) * (w + 2) + (x + 1) as usize];
    // non-maximum suppression: 0 = no, 1 = weak, 2 = strong
    let mut keep = vec![0u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let (xi, yi) = (x as isize, y as isize);
            let m = m_at(xi, yi);
            if m <= lo {
                continue;
            }
            let (dx, dy) = (dxs[y * w + x], dys[y * w + x]);
            let ax = dx.abs() as i64;
            let ay = (dy.abs() as i64) << 15;
            let t22 = ax * 13573;
            let t67 = t22 + (ax << 16);
            let max = if ay < t22 {
                m > m_at(xi - 1, yi) && m >= m_at(xi + 1, yi)
            } else if ay > t67 {
                m > m_at(xi, yi - 1) && m >= m_at(xi, yi + 1)
            } else {
                let s: isize = if (dx ^ dy) < 0 { -1 } else { 1 };
                m > m_at(xi - s, yi - 1) && m > m_at(xi + s, yi + 1)
            };
            if max {
                if m > hi {
                    keep[y * w + x] = 2;
                    stack.push((x, y));
                } else {
                    keep[y * w + x] = 1;
                }
            }
        }
    }
    // hysteresis: weak pixels 8-connected to strong ones become edges
    while let Some((x, y)) = stack.pop() {
        for dy in -1isize..=1 {
            for dx in -1isize..=1 {
                let (nx, ny) = (x as isize + dx, y as isize + dy);
                if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                    continue;
                }
                let i = ny as usize * w + nx as usize;
                if keep[i] == 1 {
                    keep[i] = 2;
                    stack.push((nx as usize, ny as usize));
                }
            }
        }
    }
    keep.into_iter()
        .map(|k| if k == 2 { 255 } else { 0 })
        .collect()
}

/// The `canny` preprocessor.
pub struct Canny;

impl Preprocessor for Canny {
    fn name(&self) -> &str {
        "canny"
    }
    fn description(&self) -> &str {
        "Canny edges, equal to cv2.Canny on the RGB image (white edges on black)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::int("low", 100, 1, 255, "lower hysteresis threshold"),
            ParamSpec::int("high", 200, 1, 255, "upper hysteresis threshold"),
        ]
    }
    fn process(&self, input: &ImageBuf, params: &Params) -> Result<ImageBuf, PluginError> {
        let rgb = hwc3(input);
        let low = params.float("low").unwrap_or(100.0);
        let high = params.float("high").unwrap_or(200.0);
        let edges = canny(&rgb, low, high);
        Ok(hwc3(&ImageBuf {
            width: rgb.width,
            height: rgb.height,
            channels: 1,
            data: edges,
        }))
    }
}

register_preprocessor!(Canny);
