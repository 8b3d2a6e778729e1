//! sd-webui-controlnet's `high_quality_resize` (scripts/controlnet.py, inside
//! `detectmap_proc`), the resize every control map takes to the generation size: nearest for
//! maps of 3..199 colours (segmentation), area when the new size has fewer pixels, bicubic
//! otherwise; a binary map (two colours, one below 16 and one above 240) is thresholded back to
//! black and white with Otsu's threshold, and a map of one-pixel edges first goes through
//! `nake_nms` and afterwards `lvmin_thin` (scripts/lvminthin.py), so edges stay one pixel wide.

use std::borrow::Cow;
use std::collections::HashSet;

use sd_plugins_api::ImageBuf;

use crate::cvresize::{resize, Interp};
use crate::lines::otsu;

/// A 3x3 structuring element as OpenCV takes it (anchor at the centre): 1 = must be set,
/// -1 = must be clear (hit-or-miss only), 0 = ignored.
type Kernel = [[i8; 3]; 3];

/// `np.rot90(k, 1)`: a quarter turn anticlockwise.
fn rot90(k: &Kernel) -> Kernel {
    let mut r = [[0; 3]; 3];
    for (i, row) in r.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = k[j][2 - i];
        }
    }
    r
}

/// The raw kernels, each in its four rotations, in lvminthin.py's order (all raws at k=0, then
/// all at k=1, ...).
fn rotations(raw: &[Kernel]) -> Vec<Kernel> {
    let mut out = Vec::with_capacity(raw.len() * 4);
    let mut cur: Vec<Kernel> = raw.to_vec();
    for _ in 0..4 {
        out.extend_from_slice(&cur);
        cur = cur.iter().map(rot90).collect();
    }
    out
}

const THIN_RAW: [Kernel; 2] = [
    [[-1, -1, -1], [0, 1, 0], [1, 1, 1]],
    [[0, -1, -1], [1, 1, -1], [0, 1, 0]],
];
const PRUNE_RAW: [Kernel; 2] = [
    [[-1, -1, -1], [-1, 1, -1], [0, 0, -1]],
    [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]],
];

/// Minimum (erode) or maximum (dilate) over the kernel's positions that equal `sel`, per
/// channel; positions outside the image are ignored (OpenCV's default morphology border).
fn morph(
    data: &[u8],
    (w, h, ch): (usize, usize, usize),
    k: &Kernel,
    sel: i8,
    max: bool,
) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..ch {
                let mut acc: Option<u8> = None;
                for (dy, row) in k.iter().enumerate() {
                    for (dx, &kv) in row.iter().enumerate() {
                        if kv != sel {
                            continue;
                        }
                        let (sx, sy) = (x as isize + dx as isize - 1, y as isize + dy as isize - 1);
                        if sx < 0 || sy < 0 || sx >= w as isize || sy >= h as isize {
                            continue;
                        }
                        let v = data[(sy as usize * w + sx as usize) * ch + c];
                        acc = Some(match acc {
                            None => v,
                            Some(a) if max => a.max(v),
                            Some(a) => a.min(v),
                        });
                    }
                }
                // nothing in range: erode gives the border's +inf (255), dilate its -inf (0)
                out[(y * w + x) * ch + c] = acc.unwrap_or(if max { 0 } else { 255 });
            }
        }
    }
    out
}

const ONES: Kernel = [[1; 3]; 3];

/// `nake_nms`: keep a pixel where it is the maximum along some direction (horizontal,
/// vertical, either diagonal), else 0.
pub fn nake_nms(grey: &[u8], w: usize, h: usize) -> Vec<u8> {
    let dirs: [Kernel; 4] = [
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]],
        [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
    ];
    let mut y = vec![0u8; grey.len()];
    for f in &dirs {
        let d = morph(grey, (w, h, 1), f, 1, true);
        for ((o, &m), &v) in y.iter_mut().zip(&d).zip(grey) {
            if m == v {
                *o = v;
            }
        }
    }
    y
}

/// lvminthin.py's `remove_pattern`: `cv2.morphologyEx(x, MORPH_HITMISS, k)` (the erosion of
/// `x` by the 1s AND the erosion of `255 - x` by the -1s), and the hits (> 127) cleared.
fn remove_pattern(x: &mut [u8], w: usize, h: usize, k: &Kernel) -> bool {
    let e1 = morph(x, (w, h, 1), k, 1, false);
    let inv: Vec<u8> = x.iter().map(|&v| 255 - v).collect();
    let e2 = morph(&inv, (w, h, 1), k, -1, false);
    let mut hit = false;
    for ((v, a), b) in x.iter_mut().zip(e1).zip(e2) {
        if a & b > 127 {
            *v = 0;
            hit = true;
        }
    }
    hit
}

fn thin_one_time(x: &mut [u8], w: usize, h: usize, kernels: &[Kernel]) -> bool {
    let mut done = true;
    for k in kernels {
        if remove_pattern(x, w, h, k) {
            done = false;
        }
    }
    done
}

/// `lvmin_thin`: up to 32 thinning passes until nothing changes, then one pruning pass.
pub fn lvmin_thin(bin: &[u8], w: usize, h: usize, prunings: bool) -> Vec<u8> {
    let mut y = bin.to_vec();
    let thin = rotations(&THIN_RAW);
    for _ in 0..32 {
        if thin_one_time(&mut y, w, h, &thin) {
            break;
        }
    }
    if prunings {
        thin_one_time(&mut y, w, h, &rotations(&PRUNE_RAW));
    }
    y
}

/// `cv2.threshold(x, 0, 255, THRESH_BINARY + THRESH_OTSU)`.
fn otsu_binary(grey: &[u8]) -> Vec<u8> {
    let t = otsu(grey);
    grey.iter().map(|&v| if v > t { 255 } else { 0 }).collect()
}

/// How many colours an RGB map has, counted up to 200 (`get_unique_axis0`; only "2", "3..199"
/// and "200 or more" matter).
fn colour_count(rgb: &[u8]) -> usize {
    let mut seen = HashSet::new();
    for p in rgb.chunks_exact(3) {
        seen.insert([p[0], p[1], p[2]]);
        if seen.len() >= 200 {
            break;
        }
    }
    seen.len()
}

fn channel(img: &ImageBuf, c: usize) -> ImageBuf {
    ImageBuf {
        width: img.width,
        height: img.height,
        channels: 1,
        data: img
            .data
            .iter()
            .skip(c)
            .step_by(img.channels)
            .copied()
            .collect(),
    }
}

/// `high_quality_resize(x, (w, h))` for an RGB map, or an RGBA one whose alpha is an inpaint
/// mark (resized with the colours' interpolation, then 255 where above 127, else 0).
pub fn high_quality_resize(img: &ImageBuf, w: usize, h: usize) -> ImageBuf {
    assert!(
        img.channels == 3 || img.channels == 4,
        "control maps are RGB or RGBA"
    );
    if (img.width, img.height) == (w, h) {
        return img.clone();
    }
    let rgb = if img.channels == 3 {
        Cow::Borrowed(img)
    } else {
        Cow::Owned(ImageBuf {
            width: img.width,
            height: img.height,
            channels: 3,
            data: img
                .data
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect(),
        })
    };
    let (old, new) = (img.width * img.height, w * h);
    let colours = colour_count(&rgb.data);
    let mut binary = false;
    let mut one_pixel_edge = false;
    if colours == 2 {
        let lo = rgb.data.iter().min().copied().unwrap_or(0);
        let hi = rgb.data.iter().max().copied().unwrap_or(0);
        binary = lo < 16 && hi > 240;
        if binary {
            let dims = (rgb.width, rgb.height, 3);
            let opened = morph(
                &morph(&rgb.data, dims, &ONES, 1, false),
                dims,
                &ONES,
                1,
                true,
            );
            let thin = opened.iter().zip(&rgb.data).filter(|(o, x)| o < x).count();
            let all = rgb.data.iter().filter(|&&v| v > 127).count();
            one_pixel_edge = thin * 2 > all;
        }
    }
    let interp = if 2 < colours && colours < 200 {
        Interp::Nearest
    } else if new < old {
        Interp::Area
    } else {
        // "Must be CUBIC because we now use nms. NEVER CHANGE THIS" (the extension)
        Interp::Cubic
    };
    let mut y = resize(&rgb, w, h, interp);
    if binary {
        let mean: Vec<u8> = y
            .data
            .chunks_exact(3)
            .map(|p| ((p[0] as f32 + p[1] as f32 + p[2] as f32) / 3.0) as u8)
            .collect();
        let grey = if one_pixel_edge {
            let t = otsu_binary(&nake_nms(&mean, w, h));
            lvmin_thin(&t, w, h, new > old)
        } else {
            otsu_binary(&mean)
        };
        y.data = grey.iter().flat_map(|&v| [v; 3]).collect();
    }
    if img.channels == 4 {
        let mark = resize(&channel(img, 3), w, h, interp);
        y = ImageBuf {
            channels: 4,
            data: y
                .data
                .chunks_exact(3)
                .zip(&mark.data)
                .flat_map(|(p, &m)| [p[0], p[1], p[2], if m > 127 { 255 } else { 0 }])
                .collect(),
            ..y
        };
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotations_follow_numpy() {
        // np.rot90([[1,2,3],[4,5,6],[7,8,9]]) == [[3,6,9],[2,5,8],[1,4,7]]
        let k: Kernel = [[1, 2, 3], [4, 5, 6], [7, 8, 9]];
        assert_eq!(rot90(&k), [[3, 6, 9], [2, 5, 8], [1, 4, 7]]);
        assert_eq!(rotations(&THIN_RAW).len(), 8);
        assert_eq!(rotations(&THIN_RAW)[2], rot90(&THIN_RAW[0]));
    }

    #[test]
    fn a_thick_line_thins_to_one_pixel() {
        let (w, h) = (12, 7);
        let mut img = vec![0u8; w * h];
        for y in 2..5 {
            for x in 1..11 {
                img[y * w + x] = 255;
            }
        }
        let t = lvmin_thin(&img, w, h, false);
        for x in 3..9 {
            let col: usize = (0..h).filter(|&y| t[y * w + x] == 255).count();
            assert_eq!(col, 1, "column {x}: {t:?}");
        }
    }
}
