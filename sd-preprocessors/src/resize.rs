//! ControlNet's `resize_image` (annotator/util.py): the short side to the detect resolution,
//! both sides rounded to multiples of 64.
//!
//! LANCZOS4 when enlarging, AREA when shrinking, with OpenCV's own arithmetic (`cvresize`).

use sd_plugins_api::{hwc3, ImageBuf};

use crate::cvresize::{resize, Interp};

/// The size `resize_image(img, resolution)` produces: `np.round(side * k / 64) * 64`.
pub fn detect_size(width: usize, height: usize, resolution: usize) -> (usize, usize) {
    let k = resolution as f64 / width.min(height).max(1) as f64;
    let round = |v: f64| {
        // numpy rounds half to even
        let r = v.round();
        if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
            r - v.signum()
        } else {
            r
        }
    };
    let side = |s: usize| ((round(s as f64 * k / 64.0)) as usize * 64).max(64);
    (side(width), side(height))
}

/// `resize_image(HWC3(img), resolution)`.
pub fn resize_image(img: &ImageBuf, resolution: usize) -> ImageBuf {
    let rgb = hwc3(img);
    let (w, h) = detect_size(rgb.width, rgb.height, resolution);
    if (w, h) == (rgb.width, rgb.height) {
        return rgb;
    }
    // annotator/util.py: k = resolution / min(H, W); LANCZOS4 if k > 1 else AREA
    let k = resolution as f64 / rgb.width.min(rgb.height) as f64;
    let interp = if k > 1.0 {
        Interp::Lanczos4
    } else {
        Interp::Area
    };
    resize(&rgb, w, h, interp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_resize_image() {
        assert_eq!(detect_size(512, 512, 512), (512, 512));
        assert_eq!(detect_size(600, 400, 512), (768, 512));
        assert_eq!(detect_size(451, 300, 512), (768, 512));
        assert_eq!(detect_size(1024, 768, 512), (704, 512));
        let img = ImageBuf::filled(512, 512, 3, 7);
        assert_eq!(resize_image(&img, 512), img);
        let r = resize_image(&ImageBuf::filled(300, 200, 3, 9), 512);
        assert_eq!((r.width, r.height), (768, 512));
        assert!(r.data.iter().all(|&v| v == 9));
    }
}
