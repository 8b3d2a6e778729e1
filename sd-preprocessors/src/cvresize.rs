//! `cv2.resize` for 8-bit images, ported from OpenCV's `resizeGeneric_` fixed-point path
//! (11-bit coefficients, integer accumulation, `(v + 2^21) >> 22`), `resizeAreaFast_`
//! (integer factors) and `ResizeArea` (float weights). Measured against OpenCV 5: nearest,
//! Lanczos4, integer-factor area and area enlarging exact; bilinear (its vectorised rounding is
//! reproduced), bicubic and fractional area within one level.

use sd_plugins_api::ImageBuf;

/// Interpolation, as OpenCV names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interp {
    Nearest,
    Linear,
    Cubic,
    Area,
    Lanczos4,
}

const COEF_BITS: i32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

pub(crate) fn cubic_coeffs(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

pub(crate) fn lanczos4_coeffs(x: f32) -> [f32; 8] {
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [[f64; 2]; 8] = [
        [1.0, 0.0],
        [-S45, -S45],
        [0.0, 1.0],
        [S45, -S45],
        [-1.0, 0.0],
        [S45, S45],
        [0.0, -1.0],
        [-S45, S45],
    ];
    let mut c = [0f32; 8];
    // `interpolateLanczos4`: x + 3 and x + 3 - i are floats there (in doubles, a tap of
    // 31 -> 552 pixels, column 32, is 784.5004 / 2048 where OpenCV has 784.5); 1e30 marks
    // the tap at x
    let y0 = -((x + 3.0) as f64) * std::f64::consts::PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    let mut sum = 0f32;
    for (i, cs) in CS.iter().enumerate() {
        let y0_ = x + 3.0 - i as f32;
        c[i] = if y0_.abs() >= 1e-6 {
            let y = -(y0_ as f64) * std::f64::consts::PI * 0.25;
            ((cs[0] * s0 + cs[1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += c[i];
    }
    let inv = 1.0 / sum;
    for v in c.iter_mut() {
        *v *= inv;
    }
    c
}

/// OpenCV's `scale_x = 1. / inv_scale_x` with `inv_scale_x = dsize / ssize` (not `ssize / dsize`,
/// which can differ in the last bit).
pub(crate) fn cv_scale(src: usize, dst: usize) -> f64 {
    1.0 / (dst as f64 / src as f64)
}

/// Source indices (clamped to the image, i.e. replicated borders) and float weights of each
/// destination position along one axis, as `resizeGeneric` computes them for `interp`
/// (Linear, Cubic, Lanczos4, or Area = INTER_AREA enlarging: bilinear with OpenCV's own
/// offsets). The 8-bit path rounds the weights to 11-bit fixed point, the float path uses them.
/// Only the horizontal axis pins a bilinear weight at the borders (`resize.cpp` clamps `sx`,
/// `fx`; for rows it keeps `fy` and replicates the row): `vertical` says which axis this is.
pub(crate) fn axis_taps(
    src: usize,
    dst: usize,
    interp: Interp,
    vertical: bool,
) -> Vec<Vec<(usize, f32)>> {
    let scale = cv_scale(src, dst);
    let inv_scale = dst as f64 / src as f64;
    let ksize: isize = match interp {
        Interp::Linear | Interp::Area => 2,
        Interp::Cubic => 4,
        _ => 8,
    };
    (0..dst)
        .map(|d| {
            let (mut sx, mut fx) = if interp == Interp::Area {
                let sx = (d as f64 * scale).floor();
                let fx = ((d as f64 + 1.0) - (sx + 1.0) * inv_scale) as f32;
                (sx as isize, if fx <= 0.0 { 0.0 } else { fx - fx.floor() })
            } else {
                let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                (f.floor() as isize, f - f.floor())
            };
            let coeffs: Vec<f32> = match interp {
                Interp::Linear | Interp::Area if vertical => vec![1.0 - fx, fx],
                Interp::Linear | Interp::Area => {
                    if sx < 0 {
                        fx = 0.0;
                        sx = 0;
                    }
                    if sx >= src as isize - 1 {
                        fx = 0.0;
                        sx = src as isize - 1;
                    }
                    vec![1.0 - fx, fx]
                }
                Interp::Cubic => cubic_coeffs(fx).to_vec(),
                _ => lanczos4_coeffs(fx).to_vec(),
            };
            coeffs
                .iter()
                .enumerate()
                .map(|(k, &w)| {
                    let j = (sx + k as isize - (ksize / 2 - 1)).clamp(0, src as isize - 1);
                    (j as usize, w)
                })
                .collect()
        })
        .collect()
}

/// Source indices and fixed-point weights of each destination position along one axis.
fn axis(src: usize, dst: usize, interp: Interp, vertical: bool) -> Vec<Vec<(usize, i32)>> {
    axis_taps(src, dst, interp, vertical)
        .into_iter()
        .map(|t| {
            t.into_iter()
                // saturate_cast<short>: rounds half to even (784.5 -> 784)
                .map(|(j, w)| (j, (w * COEF_SCALE).round_ties_even() as i32))
                .collect()
        })
        .collect()
}

/// `resizeNN`'s source index of each destination position along one axis.
pub(crate) fn nearest_index(src: usize, dst: usize) -> Vec<usize> {
    let ifx = cv_scale(src, dst);
    (0..dst)
        .map(|d| ((d as f64 * ifx).floor() as usize).min(src - 1))
        .collect()
}

/// The integer shrink factors when INTER_AREA takes `resizeAreaFast` (both scales integers).
pub(crate) fn area_fast_factors(
    (src_w, src_h): (usize, usize),
    (w, h): (usize, usize),
) -> Option<(usize, usize)> {
    let (sx, sy) = (cv_scale(src_w, w), cv_scale(src_h, h));
    let (ix, iy) = (sx.round(), sy.round());
    ((sx - ix).abs() < f64::EPSILON && (sy - iy).abs() < f64::EPSILON)
        .then_some((ix as usize, iy as usize))
}

/// `computeResizeAreaTab`: the source pixels of each destination position along one axis and
/// their fractional-overlap weights (INTER_AREA shrinking by a non-integer factor).
pub(crate) fn area_tab(src: usize, dst: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = cv_scale(src, dst);
    (0..dst)
        .map(|d| {
            let f1 = d as f64 * scale;
            let f2 = f1 + scale;
            let cell = scale.min(src as f64 - f1);
            let s2 = (f2.floor() as isize).min(src as isize - 1);
            let s1 = (f1.ceil() as isize).min(s2);
            let mut v = Vec::new();
            if s1 as f64 - f1 > 1e-3 {
                v.push(((s1 - 1) as usize, ((s1 as f64 - f1) / cell) as f32));
            }
            for s in s1..s2 {
                v.push((s as usize, (1.0 / cell) as f32));
            }
            if f2 - s2 as f64 > 1e-3 {
                v.push((
                    s2 as usize,
                    ((f2 - s2 as f64).min(1.0).min(cell) / cell) as f32,
                ));
            }
            v
        })
        .collect()
}

fn generic(img: &ImageBuf, w: usize, h: usize, interp: Interp) -> Vec<u8> {
    let c = img.channels;
    let xt = axis(img.width, w, interp, false);
    let yt = axis(img.height, h, interp, true);
    // horizontal pass on every source row, integer
    let rows: Vec<Vec<i32>> = (0..img.height)
        .map(|y| {
            let row = &img.data[y * img.width * c..(y + 1) * img.width * c];
            let mut out = vec![0i32; w * c];
            for (dx, taps) in xt.iter().enumerate() {
                for ch in 0..c {
                    out[dx * c + ch] = taps.iter().map(|&(j, a)| row[j * c + ch] as i32 * a).sum();
                }
            }
            out
        })
        .collect();
    let mut out = vec![0u8; w * h * c];
    for (dy, taps) in yt.iter().enumerate() {
        for i in 0..w * c {
            let v = if taps.len() == 2 {
                // OpenCV's vectorised bilinear rows (VResizeLinearVec_32s8u), which is what
                // runs on x86: 16-bit products, rounded twice
                let (s0, s1) = (rows[taps[0].0][i], rows[taps[1].0][i]);
                let (b0, b1) = (taps[0].1, taps[1].1);
                (((b0 * (s0 >> 4)) >> 16) + ((b1 * (s1 >> 4)) >> 16) + 2) >> 2
            } else {
                let v: i64 = taps
                    .iter()
                    .map(|&(j, b)| rows[j][i] as i64 * b as i64)
                    .sum();
                ((v + (1 << 21)) >> 22) as i32
            };
            out[dy * w * c + i] = v.clamp(0, 255) as u8;
        }
    }
    out
}

fn nearest(img: &ImageBuf, w: usize, h: usize) -> Vec<u8> {
    let (xs, ys) = (nearest_index(img.width, w), nearest_index(img.height, h));
    let mut out = Vec::with_capacity(w * h * img.channels);
    for &yy in &ys {
        for &xx in &xs {
            out.extend_from_slice(img.pixel(xx, yy));
        }
    }
    out
}

/// Shrinking by area averaging: integer factors exactly (`(sum + area / 2) / area`), others by
/// OpenCV's fractional-overlap weights in float.
fn area(img: &ImageBuf, w: usize, h: usize) -> Vec<u8> {
    let c = img.channels;
    if let Some((ix, iy)) = area_fast_factors((img.width, img.height), (w, h)) {
        let a = (ix * iy) as u32;
        let mut out = Vec::with_capacity(w * h * c);
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let mut s = 0u32;
                    for yy in 0..iy {
                        for xx in 0..ix {
                            s += img.pixel(x * ix + xx, y * iy + yy)[ch] as u32;
                        }
                    }
                    out.push(((s + a / 2) / a) as u8);
                }
            }
        }
        return out;
    }
    // fractional overlaps along each axis
    let xt = area_tab(img.width, w);
    let yt = area_tab(img.height, h);
    let mut out = vec![0u8; w * h * c];
    for (dy, ys) in yt.iter().enumerate() {
        for (dx, xs) in xt.iter().enumerate() {
            for ch in 0..c {
                let mut s = 0f32;
                for &(sy, wy) in ys {
                    let mut r = 0f32;
                    for &(sx, wx) in xs {
                        r += img.pixel(sx, sy)[ch] as f32 * wx;
                    }
                    s += r * wy;
                }
                out[(dy * w + dx) * c + ch] = s.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// `cv2.resize(img, (w, h), interpolation=interp)` for 8-bit images.
pub fn resize(img: &ImageBuf, w: usize, h: usize, interp: Interp) -> ImageBuf {
    if (w, h) == (img.width, img.height) {
        return img.clone();
    }
    let data = match interp {
        Interp::Nearest => nearest(img, w, h),
        Interp::Area if w <= img.width && h <= img.height => area(img, w, h),
        // enlarging (in either direction) with INTER_AREA is OpenCV's area-offset bilinear
        Interp::Area => generic(img, w, h, Interp::Area),
        i => generic(img, w, h, i),
    };
    ImageBuf {
        width: w,
        height: h,
        channels: img.channels,
        data,
    }
}
