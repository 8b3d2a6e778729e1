//! OpenPose faces: the box controlnet_aux's `util.faceDetect` derives from a body's head
//! keypoints, and `Face.__call__` / `compute_peaks_from_heatmaps` on it (the crop resized to
//! 384x384, the face network, its last stage interpolated back to the crop bilinearly with
//! aligned corners, per heatmap the first maximum above 0.05), ported operation for operation.

use candle_core::{Device, Tensor};
use sd_plugins_api::ImageBuf;

use super::cpm::CpmNet;
use super::hand::normalise;
use super::smart_interp;
use crate::cvresize;
use crate::pose::Keypoint;

/// The weight files looked for in the annotator folder.
pub const WEIGHT_FILES: [&str; 2] = ["facenet.pth", "facenet.safetensors"];
/// Heatmaps of the face network: 70 points and the background (which the reference also
/// searches for a peak).
pub const OUTPUTS: usize = 71;

const INPUT: usize = 384;
const THRESHOLD: f32 = 0.05;

/// What gives the face heatmaps: `[1, 3, 384, 384]` (BGR, `/256 - 0.5`) to the last stage's
/// `[1, 71, 48, 48]`. [`CpmNet`], or canned outputs where a test replaces the network.
pub trait FaceNetwork {
    fn face_maps(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

impl FaceNetwork for CpmNet {
    fn face_maps(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x)
    }
}

/// A square box around a face (top-left corner and side in pixels); a crop of it may be cut
/// by the image's right or bottom edge, as the reference's slicing cuts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaceBox {
    pub x: usize,
    pub y: usize,
    pub side: usize,
}

/// `util.faceDetect`: from a body's keypoints in pixels (nose, eyes, ears), the face's box when
/// the nose and an eye or ear are there and the box is at least 20 pixels.
pub fn face_box(body: &[Keypoint], width: usize, height: usize) -> Option<FaceBox> {
    let get = |i: usize| body.get(i).copied().flatten();
    let (x0, y0) = get(0)?;
    let (eyes, ears) = ([get(14), get(15)], [get(16), get(17)]);
    if eyes.iter().chain(&ears).all(|k| k.is_none()) {
        return None;
    }
    let mut width_ = 0f64;
    for (points, k) in [(eyes, 3.0), (ears, 1.5)] {
        for (x1, y1) in points.into_iter().flatten() {
            let d = (x0 - x1).abs().max((y0 - y1).abs());
            width_ = width_.max(d * k);
        }
    }
    let (mut x, mut y) = (x0 - width_, y0 - width_);
    if x < 0.0 {
        x = 0.0;
    }
    if y < 0.0 {
        y = 0.0;
    }
    let (mut w1, mut w2) = (width_ * 2.0, width_ * 2.0);
    if x + width_ > width as f64 {
        w1 = width as f64 - x;
    }
    if y + width_ > height as f64 {
        w2 = height as f64 - y;
    }
    let side = w1.min(w2);
    (side >= 20.0).then_some(FaceBox {
        x: x as usize,
        y: y as usize,
        side: side as usize,
    })
}

/// `F.interpolate(x, (h, w), mode="bilinear", align_corners=True)` of `[c, ih, iw]` f32 maps as
/// PyTorch's CPU kernels compute it (measured bit-exact against torch 2 on an AVX-512
/// build): outputs with h + w <= 128 take the channels-last kernel (its vector part, 16
/// channels at a time, and its scalar tail differ in the order of their fused multiply-adds),
/// larger ones the separable generic kernel.
pub fn interpolate_bilinear(
    x: &[f32],
    (c, ih, iw): (usize, usize, usize),
    (h, w): (usize, usize),
) -> Vec<f32> {
    // (index0, index1, lambda0, lambda1) per output position, in float as PyTorch does
    let axis = |input: usize, output: usize| -> Vec<Taps> {
        let scale = if output > 1 {
            (input - 1) as f32 / (output - 1) as f32
        } else {
            0.0
        };
        (0..output)
            .map(|o| {
                if input == output {
                    return (o, o, 1.0, 0.0);
                }
                let r = scale * o as f32;
                let i0 = (r.floor() as usize).min(input - 1);
                let l1 = (r - i0 as f32).clamp(0.0, 1.0);
                let i1 = i0 + usize::from(i0 < input - 1);
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let (ys, xs) = (axis(ih, h), axis(iw, w));
    let mut out = vec![0f32; c * h * w];
    if h * w == 0 || ih * iw == 0 {
        return out;
    }
    let kernel = Kernel {
        small: h + w <= 128,
        vector_channels: c - c % 16,
    };
    // channel planes in parallel (every value computed as in a serial loop)
    let per = c.div_ceil(crate::conv::threads()).max(1);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * h * w).enumerate() {
            let (ys, xs) = (&ys, &xs);
            s.spawn(move || {
                for (j, dst) in chunk.chunks_mut(h * w).enumerate() {
                    let ch = i * per + j;
                    let src = &x[ch * ih * iw..(ch + 1) * ih * iw];
                    interpolate_plane(src, iw, ch, kernel, ys, xs, dst);
                }
            });
        }
    });
    out
}

type Taps = (usize, usize, f32, f32);

/// Which of PyTorch's kernels a size takes ([`interpolate_bilinear`]).
#[derive(Clone, Copy)]
struct Kernel {
    small: bool,
    vector_channels: usize,
}

// the fused multiply-adds inlined (a baseline x86-64 build calls libm's `fmaf` for each)
sd_pipeline::simd_dispatch!(fn interpolate_plane(src: &[f32], iw: usize, ch: usize, k: Kernel, ys: &[Taps], xs: &[Taps], dst: &mut [f32]) -> () = interpolate_plane_body);

#[inline(always)]
fn interpolate_plane_body(
    src: &[f32],
    iw: usize,
    ch: usize,
    k: Kernel,
    ys: &[Taps],
    xs: &[Taps],
    dst: &mut [f32],
) {
    let at = |y: usize, xx: usize| src[y * iw + xx];
    let w = xs.len();
    for (oy, &(y0, y1, hl0, hl1)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, wl0, wl1)) in xs.iter().enumerate() {
            let (w00, w01, w10, w11) = (hl0 * wl0, hl0 * wl1, hl1 * wl0, hl1 * wl1);
            let (a, b) = (at(y0, x0), at(y0, x1));
            let (cc, d) = (at(y1, x0), at(y1, x1));
            dst[oy * w + ox] = if !k.small {
                let t0 = a.mul_add(wl0, b * wl1);
                let t1 = cc.mul_add(wl0, d * wl1);
                t0.mul_add(hl0, t1 * hl1)
            } else if ch < k.vector_channels {
                a.mul_add(w00, b.mul_add(w01, d.mul_add(w11, cc * w10)))
            } else {
                d.mul_add(w11, cc.mul_add(w10, a.mul_add(w00, b * w01)))
            };
        }
    }
}

/// `Face.__call__` on a face's crop (BGR): the heatmaps at the crop's size, `[71, h, w]`.
pub fn face_heatmaps(
    net: &dyn FaceNetwork,
    crop: &ImageBuf,
    device: &Device,
) -> Result<Vec<f32>, String> {
    let (w, h) = (crop.width, crop.height);
    if w == 0 || h == 0 {
        return Err("empty face crop".into());
    }
    let size = INPUT as f64;
    let img = cvresize::resize(crop, INPUT, INPUT, smart_interp((h, w), (size, size)));
    let n = INPUT * INPUT;
    let mut x = vec![0f32; 3 * n];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            x[c * n + i] = px[c] as f32 / 256.0 - 0.5;
        }
    }
    let run = || -> candle_core::Result<_> {
        let x = Tensor::from_vec(x, (1, 3, INPUT, INPUT), &Device::Cpu)?.to_device(device)?;
        let out = net.face_maps(&x)?.to_device(&Device::Cpu)?;
        let (_, c, oh, ow) = out.dims4()?;
        Ok((out.flatten_all()?.to_vec1::<f32>()?, c, oh, ow))
    };
    let (maps, c, oh, ow) = run().map_err(|e| e.to_string())?;
    if c != OUTPUTS {
        return Err(format!(
            "the face network gave {c} heatmaps, expected {OUTPUTS}"
        ));
    }
    Ok(interpolate_bilinear(&maps, (c, oh, ow), (h, w)))
}

/// `Face.compute_peaks_from_heatmaps`: per heatmap the (column, row) of its first maximum
/// when it is above 0.05; heatmaps without one are left out (the list closes up).
pub fn face_peaks(maps: &[f32], (w, h): (usize, usize)) -> Vec<(usize, usize)> {
    let n = w * h;
    maps.chunks_exact(n)
        .filter_map(|m| {
            let mut best: Option<(usize, f32)> = None;
            for (i, &v) in m.iter().enumerate() {
                if v > THRESHOLD && best.is_none_or(|(_, b)| v > b) {
                    best = Some((i, v));
                }
            }
            best.map(|(i, _)| (i % w, i / w))
        })
        .collect()
}

/// The keypoints of a face found in `b`, normalised by the image size.
pub fn face_keypoints(peaks: &[(usize, usize)], b: &FaceBox, w: usize, h: usize) -> Vec<Keypoint> {
    peaks
        .iter()
        .map(|&(x, y)| Some((normalise(x, b.x, w), normalise(y, b.y, h))))
        .collect()
}
