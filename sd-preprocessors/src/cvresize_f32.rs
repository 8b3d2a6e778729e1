//! `cv2.resize` for float32 images (`CV_32F`, any channel count, HWC interleaved), ported from
//! OpenCV's float paths: `resizeGeneric_` with float coefficients (linear, bicubic A = -0.75,
//! normalised Lanczos4; source indices clamped to the image, i.e. replicated borders),
//! `resizeNN`, `resizeAreaFast_` (integer shrink factors: block mean), `resizeArea_`
//! (fractional shrink: area-coverage weights) and INTER_AREA enlarging (bilinear with OpenCV's
//! area offsets). The coefficient and tap tables are the 8-bit port's ([`crate::cvresize`]);
//! here they stay in float and accumulate in f32 as OpenCV does (its SIMD code sums in another
//! order, so results agree to float rounding, about 1e-6 for values of order 1).
//!
//! OpenCV 5 refuses fractional INTER_AREA shrinking of more than 4 channels; this computes
//! what it does channel by channel (and what OpenCV 4 computes).

pub use crate::cvresize::Interp;
use crate::cvresize::{area_fast_factors, area_tab, axis_taps, nearest_index};

/// `cv2.resize(src, (dst_w, dst_h), interpolation=interp)` for a float32 image of
/// `width * height * channels` values (rows top to bottom, channels interleaved).
pub fn resize_f32(
    src: &[f32],
    width: usize,
    height: usize,
    channels: usize,
    dst_w: usize,
    dst_h: usize,
    interp: Interp,
) -> Vec<f32> {
    assert_eq!(
        src.len(),
        width * height * channels,
        "resize_f32: buffer of {} values for {width}x{height}x{channels}",
        src.len()
    );
    assert!(
        width > 0 && height > 0 && dst_w > 0 && dst_h > 0,
        "resize_f32: empty image"
    );
    if (dst_w, dst_h) == (width, height) {
        return src.to_vec();
    }
    let img = Img {
        data: src,
        width,
        channels,
    };
    match interp {
        Interp::Nearest => nearest(&img, height, dst_w, dst_h),
        Interp::Area if dst_w <= width && dst_h <= height => {
            match area_fast_factors((width, height), (dst_w, dst_h)) {
                Some((fx, fy)) => area_fast(&img, dst_w, dst_h, fx, fy),
                None => separable(
                    &img,
                    height,
                    &area_tab(width, dst_w),
                    &area_tab(height, dst_h),
                ),
            }
        }
        // INTER_AREA enlarging (in either direction) is bilinear with the area offsets
        i => separable(
            &img,
            height,
            &axis_taps(width, dst_w, i, false),
            &axis_taps(height, dst_h, i, true),
        ),
    }
}

struct Img<'a> {
    data: &'a [f32],
    width: usize,
    channels: usize,
}

/// Horizontal pass on every source row, then a vertical pass over the rows a destination row
/// needs (`resizeGeneric_` / `resizeArea_`, float accumulators).
fn separable(
    img: &Img,
    height: usize,
    xt: &[Vec<(usize, f32)>],
    yt: &[Vec<(usize, f32)>],
) -> Vec<f32> {
    let c = img.channels;
    let w = xt.len();
    let rows: Vec<Vec<f32>> = (0..height)
        .map(|y| {
            let row = &img.data[y * img.width * c..(y + 1) * img.width * c];
            let mut out = vec![0f32; w * c];
            for (dx, taps) in xt.iter().enumerate() {
                for ch in 0..c {
                    out[dx * c + ch] = taps.iter().map(|&(j, a)| row[j * c + ch] * a).sum();
                }
            }
            out
        })
        .collect();
    let mut out = vec![0f32; w * yt.len() * c];
    for (dy, taps) in yt.iter().enumerate() {
        let dst = &mut out[dy * w * c..(dy + 1) * w * c];
        for &(j, b) in taps {
            for (d, s) in dst.iter_mut().zip(&rows[j]) {
                *d += b * s;
            }
        }
    }
    out
}

fn nearest(img: &Img, height: usize, w: usize, h: usize) -> Vec<f32> {
    let c = img.channels;
    let (xs, ys) = (nearest_index(img.width, w), nearest_index(height, h));
    let mut out = Vec::with_capacity(w * h * c);
    for &yy in &ys {
        for &xx in &xs {
            let i = (yy * img.width + xx) * c;
            out.extend_from_slice(&img.data[i..i + c]);
        }
    }
    out
}

/// Integer shrink factors: the block's sum times `1 / (fx * fy)`.
fn area_fast(img: &Img, w: usize, h: usize, fx: usize, fy: usize) -> Vec<f32> {
    let c = img.channels;
    let scale = 1.0 / (fx * fy) as f32;
    let mut out = Vec::with_capacity(w * h * c);
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let mut s = 0f32;
                for yy in y * fy..(y + 1) * fy {
                    for xx in x * fx..(x + 1) * fx {
                        s += img.data[(yy * img.width + xx) * c + ch];
                    }
                }
                out.push(s * scale);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images_stay_constant() {
        let src = vec![0.25f32; 7 * 5 * 19];
        for interp in [
            Interp::Nearest,
            Interp::Linear,
            Interp::Cubic,
            Interp::Area,
            Interp::Lanczos4,
        ] {
            for (w, h) in [(3, 2), (14, 10), (56, 40), (4, 9)] {
                let out = resize_f32(&src, 7, 5, 19, w, h, interp);
                assert_eq!(out.len(), w * h * 19);
                let worst = out.iter().map(|v| (v - 0.25).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-6, "{interp:?} {w}x{h}: off by {worst}");
            }
        }
    }

    #[test]
    fn area_block_mean_and_linear_ramp() {
        // 4x2 -> 2x1 with INTER_AREA: means of 2x2 blocks, per channel
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect(); // 4x2, 2 channels
        let out = resize_f32(&src, 4, 2, 2, 2, 1, Interp::Area);
        assert_eq!(out, vec![5.0, 6.0, 9.0, 10.0]);
        // bilinear keeps a ramp a ramp inside the image (half-pixel centres)
        let ramp: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let out = resize_f32(&ramp, 8, 1, 1, 4, 1, Interp::Linear);
        assert_eq!(out, vec![0.5, 2.5, 4.5, 6.5]);
    }
}
