//! OpenPose hands: the boxes controlnet_aux's `util.handDetect` derives from a body's arm
//! keypoints, and `Hand.__call__` on each box (8-bit Gaussian blur, the hand network at four
//! scales, heatmaps averaged at 128x128, per part the connected region of largest sum above
//! 0.05 after smoothing and its maximum), ported operation for operation.

use candle_core::{Device, Tensor};
use sd_plugins_api::ImageBuf;

use super::cpm::CpmNet;
use super::{smart_interp, to_hwc, upsample, PAD_VALUE, STRIDE};
use crate::cvresize;
use crate::pose::Keypoint;

/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["hand_pose_model.pth", "hand_pose_model.safetensors"];
/// Heatmaps of the hand network: 21 points and the background.
pub const OUTPUTS: usize = 22;
/// Hand points.
pub const POINTS: usize = 21;

const SCALES: [f64; 4] = [0.5, 1.0, 1.5, 2.0];
const BOXSIZE: f64 = 368.0;
const WSIZE: usize = 128;
const THRE: f64 = 0.05;

/// What gives the hand heatmaps: `[1, 3, S, S]` (BGR, `/256 - 0.5`) to `[1, 22, S/8, S/8]`.
/// [`CpmNet`], or canned outputs where a test replaces the network.
pub trait HandNetwork {
    fn hand_maps(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

impl HandNetwork for CpmNet {
    fn hand_maps(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x)
    }
}

/// A square box around a hand: top-left corner and side in pixels, and which hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandBox {
    pub x: usize,
    pub y: usize,
    pub side: usize,
    pub left: bool,
}

/// `util.handDetect`: from a body's keypoints in pixels (shoulder, elbow and wrist of each
/// arm), the boxes of the left then the right hand, each at least 20 pixels, within the image.
pub fn hand_boxes(body: &[Keypoint], width: usize, height: usize) -> Vec<HandBox> {
    const RATIO: f64 = 0.33;
    let get = |i: usize| body.get(i).copied().flatten();
    let mut out = Vec::new();
    for (s, e, w, left) in [(5, 6, 7, true), (2, 3, 4, false)] {
        let (Some((x1, y1)), Some((x2, y2)), Some((x3, y3))) = (get(s), get(e), get(w)) else {
            continue;
        };
        let mut x = x3 + RATIO * (x3 - x2);
        let mut y = y3 + RATIO * (y3 - y2);
        let wrist_elbow = ((x3 - x2) * (x3 - x2) + (y3 - y2) * (y3 - y2)).sqrt();
        let elbow_shoulder = ((x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1)).sqrt();
        let mut side = 1.5 * wrist_elbow.max(0.9 * elbow_shoulder);
        x -= side / 2.0;
        y -= side / 2.0;
        if x < 0.0 {
            x = 0.0;
        }
        if y < 0.0 {
            y = 0.0;
        }
        let (mut w1, mut w2) = (side, side);
        if x + side > width as f64 {
            w1 = width as f64 - x;
        }
        if y + side > height as f64 {
            w2 = height as f64 - y;
        }
        side = w1.min(w2);
        if side >= 20.0 {
            out.push(HandBox {
                x: x as usize,
                y: y as usize,
                side: side as usize,
                left,
            });
        }
    }
    out
}

/// The part of `img` from (x, y), `w` x `h` pixels, clipped to the image (numpy slicing).
pub fn crop(img: &ImageBuf, x: usize, y: usize, w: usize, h: usize) -> ImageBuf {
    let (x1, y1) = ((x + w).min(img.width), (y + h).min(img.height));
    let (x0, y0) = (x.min(x1), y.min(y1));
    let c = img.channels;
    let mut data = Vec::with_capacity((x1 - x0) * (y1 - y0) * c);
    for yy in y0..y1 {
        data.extend_from_slice(&img.data[(yy * img.width + x0) * c..(yy * img.width + x1) * c]);
    }
    ImageBuf {
        width: x1 - x0,
        height: y1 - y0,
        channels: c,
        data,
    }
}

/// `cv2.GaussianBlur(img, (0, 0), sigma)` on an 8-bit image, bit-exact: OpenCV's fixed-point
/// path (`GaussianBlurFixedPoint`): `round(6 sigma + 1) | 1` taps from
/// `getGaussianKernelBitExact`, turned into 8-bit fixed point with error diffusion
/// (`getGaussianKernelFixedPoint_ED`, taps summing to 256), rows then columns in integers,
/// `(v + 2^15) >> 16`, borders reflected without repeating the edge (BORDER_REFLECT_101).
pub fn gaussian_blur_u8(img: &ImageBuf, sigma: f64) -> ImageBuf {
    let n = (((sigma * 6.0 + 1.0).round_ties_even()) as usize) | 1;
    let k = fixed_gaussian_kernel(n, sigma);
    let (w, h, c) = (img.width, img.height, img.channels);
    // a side of one pixel gets a one-tap kernel (OpenCV sets ksize to 1 there)
    let kx = if w == 1 { vec![256] } else { k.clone() };
    let ky = if h == 1 { vec![256] } else { k };
    let reflect = |i: isize, len: usize| -> usize {
        if len == 1 {
            return 0;
        }
        let len = len as isize;
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
    let (rx, ry) = ((kx.len() / 2) as isize, (ky.len() / 2) as isize);
    let mut rows = vec![0u32; w * h * c];
    for y in 0..h {
        let line = &img.data[y * w * c..(y + 1) * w * c];
        for x in 0..w {
            for ch in 0..c {
                let mut s = 0u32;
                for (t, &kv) in kx.iter().enumerate() {
                    let sx = reflect(x as isize + t as isize - rx, w);
                    s += kv * line[sx * c + ch] as u32;
                }
                rows[(y * w + x) * c + ch] = s;
            }
        }
    }
    let mut data = vec![0u8; w * h * c];
    for y in 0..h {
        for i in 0..w * c {
            let mut s = 0u32;
            for (t, &kv) in ky.iter().enumerate() {
                let sy = reflect(y as isize + t as isize - ry, h);
                s += kv * rows[sy * w * c + i];
            }
            data[y * w * c + i] = ((s + (1 << 15)) >> 16).min(255) as u8;
        }
    }
    ImageBuf {
        width: w,
        height: h,
        channels: c,
        data,
    }
}

/// OpenCV's `getGaussianKernelBitExact` (in doubles) then `getGaussianKernelFixedPoint_ED`
/// with 8 fraction bits: odd `n` taps summing to 256.
fn fixed_gaussian_kernel(n: usize, sigma: f64) -> Vec<u32> {
    let half = (n - 1) / 2;
    let scale2 = -0.125 / (sigma * sigma);
    let values: Vec<f64> = (0..half)
        .map(|i| {
            let x = (2 * i) as f64 + 1.0 - n as f64;
            (x * x * scale2).exp()
        })
        .collect();
    let mut sum = 0f64;
    for v in &values {
        sum += v;
    }
    sum *= 2.0;
    sum += 1.0;
    let mul = 1.0 / sum;
    let mut out = vec![0u32; n];
    let (mut err, mut total) = (0f64, 0i64);
    for i in 0..half {
        let adj = values[i] * mul * 256.0 + err;
        let v = adj.round_ties_even() as i64;
        err = adj - v as f64;
        out[i] = v as u32;
        out[n - 1 - i] = v as u32;
        total += v;
    }
    out[half] = (256 - 2 * total) as u32;
    out
}

/// numpy's pairwise sum of float64 values (`np.sum` of a contiguous array).
pub fn np_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [0f64; 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        let mut i = 8;
        while i < full {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for v in &a[full..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        np_sum(&a[..n2]) + np_sum(&a[n2..])
    }
}

/// `skimage.measure.label(binary, connectivity=2)`: 8-connected regions numbered 1.. in the
/// order their first pixel comes in a raster scan; 0 = background.
pub fn label(binary: &[bool], w: usize, h: usize) -> (Vec<u32>, u32) {
    let mut parent: Vec<usize> = (0..w * h).collect();
    fn find(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            if !binary[i] {
                continue;
            }
            let join = |j: usize, p: &mut Vec<usize>| {
                if binary[j] {
                    let (a, b) = (find(p, i), find(p, j));
                    if a != b {
                        p[a.max(b)] = a.min(b);
                    }
                }
            };
            if x > 0 {
                join(i - 1, &mut parent);
            }
            if y > 0 {
                join(i - w, &mut parent);
                if x > 0 {
                    join(i - w - 1, &mut parent);
                }
                if x + 1 < w {
                    join(i - w + 1, &mut parent);
                }
            }
        }
    }
    let mut labels = vec![0u32; w * h];
    let mut number = vec![0u32; w * h];
    let mut count = 0;
    for i in 0..w * h {
        if binary[i] {
            let r = find(&mut parent, i);
            if number[r] == 0 {
                count += 1;
                number[r] = count;
            }
            labels[i] = number[r];
        }
    }
    (labels, count)
}

/// One part's peak from its averaged 128x128 heatmap (`Hand.__call__`'s loop body): `None`
/// when nothing passes 0.05 after smoothing, else the (column, row) of the maximum within the
/// connected region of largest sum.
fn part_peak(map: &[f64]) -> Option<(usize, usize)> {
    let smooth = super::assemble::gaussian_filter(map, WSIZE, WSIZE, 3.0);
    let binary: Vec<bool> = smooth.iter().map(|&v| v > THRE).collect();
    if !binary.iter().any(|&b| b) {
        return None;
    }
    let (labels, n) = label(&binary, WSIZE, WSIZE);
    let mut best = (0u32, f64::NEG_INFINITY);
    for l in 1..=n {
        let vals: Vec<f64> = map
            .iter()
            .zip(&labels)
            .filter(|(_, &lb)| lb == l)
            .map(|(&v, _)| v)
            .collect();
        let s = np_sum(&vals);
        // np.argmax: the first of equal maxima (NaN wins, as it does there)
        if s > best.1 || (s.is_nan() && !best.1.is_nan()) || best.0 == 0 {
            best = (l, s);
        }
    }
    // the map with everything outside the region zeroed, and its first maximum (npmax)
    let mut at = 0;
    let mut max = f64::NEG_INFINITY;
    for (i, (&v, &lb)) in map.iter().zip(&labels).enumerate() {
        let v = if lb == best.0 { v } else { 0.0 };
        if v > max {
            max = v;
            at = i;
        }
    }
    Some((at % WSIZE, at / WSIZE))
}

/// `Hand.__call__` on a hand's crop (BGR): the 21 points in crop pixels, (0, 0) where a part
/// was not found.
pub fn hand_peaks(
    net: &dyn HandNetwork,
    crop: &ImageBuf,
    device: &Device,
) -> Result<Vec<(usize, usize)>, String> {
    let (wr, hr) = (crop.width, crop.height);
    let blurred = gaussian_blur_u8(crop, 0.8);
    let mut avg = vec![0f64; WSIZE * WSIZE * OUTPUTS];
    for m in SCALES {
        let scale = m * BOXSIZE;
        let s = scale as usize;
        let img = cvresize::resize(&blurred, s, s, smart_interp((hr, wr), (scale, scale)));
        let p = s.div_ceil(STRIDE) * STRIDE;
        let mut x = vec![PAD_VALUE as f32 / 256.0 - 0.5; 3 * p * p];
        for yy in 0..s {
            for xx in 0..s {
                for c in 0..3 {
                    x[c * p * p + yy * p + xx] =
                        img.data[(yy * s + xx) * 3 + c] as f32 / 256.0 - 0.5;
                }
            }
        }
        let run = || -> candle_core::Result<_> {
            let x = Tensor::from_vec(x, (1, 3, p, p), &Device::Cpu)?.to_device(device)?;
            to_hwc(&net.hand_maps(&x)?.to_device(&Device::Cpu)?)
        };
        let (out, c, oh, ow) = run().map_err(|e| e.to_string())?;
        if c != OUTPUTS {
            return Err(format!(
                "the hand network gave {c} heatmaps, expected {OUTPUTS}"
            ));
        }
        let up = upsample(&out, (c, oh, ow), (s, s), (WSIZE, WSIZE));
        for (a, u) in avg.iter_mut().zip(&up) {
            *a += u / SCALES.len() as f64;
        }
    }
    let mut peaks = Vec::with_capacity(POINTS);
    for part in 0..POINTS {
        let map: Vec<f64> = (0..WSIZE * WSIZE)
            .map(|i| avg[i * OUTPUTS + part])
            .collect();
        peaks.push(match part_peak(&map) {
            // int(float(y) * float(Hr) / float(wsize))
            Some((x, y)) => (
                ((x as f64 * wr as f64) / WSIZE as f64) as usize,
                ((y as f64 * hr as f64) / WSIZE as f64) as usize,
            ),
            None => (0, 0),
        });
    }
    Ok(peaks)
}

/// A crop point as `OpenposeDetector` normalises it, in float32: -1 where the coordinate is
/// 0, else the crop offset added; divided by the image side.
pub fn normalise(v: usize, offset: usize, side: usize) -> f64 {
    let v = v as f32;
    let p = if v < 1e-6 { -1.0 } else { v + offset as f32 };
    (p / side as f32) as f64
}

/// The keypoints of a hand found in `b`, normalised by the image size.
pub fn hand_keypoints(peaks: &[(usize, usize)], b: &HandBox, w: usize, h: usize) -> Vec<Keypoint> {
    peaks
        .iter()
        .map(|&(x, y)| Some((normalise(x, b.x, w), normalise(y, b.y, h))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blur_kernel_for_sigma_0_8_is_opencvs() {
        // cv2.GaussianBlur(u8, (0, 0), 0.8) blurs with [0, 6, 58, 128, 58, 6, 0] / 256
        assert_eq!(fixed_gaussian_kernel(7, 0.8), vec![0, 6, 58, 128, 58, 6, 0]);
    }

    #[test]
    fn labels_follow_the_raster_scan() {
        // skimage.measure.label of this map (connectivity 2) numbers the regions 1, 2, 3
        let b = [
            [0, 0, 0, 0, 0, 1],
            [1, 0, 1, 0, 0, 0],
            [1, 0, 1, 0, 1, 1],
            [1, 1, 1, 0, 0, 0],
        ];
        let flat: Vec<bool> = b.iter().flatten().map(|&v| v == 1).collect();
        let (l, n) = label(&flat, 6, 4);
        assert_eq!(n, 3);
        assert_eq!(
            l,
            vec![0, 0, 0, 0, 0, 1, 2, 0, 2, 0, 0, 0, 2, 0, 2, 0, 3, 3, 2, 2, 2, 0, 0, 0]
        );
    }

    #[test]
    fn pairwise_sum_splits_like_numpy() {
        // np.sum of 1 / (i + 1), i < 300: 6.282663880299504 (a plain loop: ...502)
        let a: Vec<f64> = (0..300).map(|i| 1.0 / (i + 1) as f64).collect();
        assert_eq!(np_sum(&a), 6.282663880299504);
    }
}
