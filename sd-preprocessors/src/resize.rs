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

/// sd-webui-controlnet's pixel-perfect detect resolution for a raw image of `raw_w` x
/// `raw_h` and a generation of `w` x `h` (sizes floored to multiples of 8); "Resize and Fill"
/// (`outer_fit`) uses the smaller ratio.
pub fn pixel_perfect_resolution(
    raw_w: usize,
    raw_h: usize,
    w: usize,
    h: usize,
    outer_fit: bool,
) -> usize {
    let (w, h) = ((w / 8 * 8) as f64, (h / 8 * 8) as f64);
    let (kx, ky) = (w / raw_w as f64, h / raw_h as f64);
    let k = if outer_fit { kx.min(ky) } else { kx.max(ky) };
    (k * raw_w.min(raw_h) as f64).round() as usize
}

/// sd-webui-controlnet's `resize_image_with_pad`: the short side to `resolution` (sides
/// rounded, CUBIC when enlarging, AREA when shrinking), then edge-replicated padding on the
/// bottom and right to multiples of 64. Returns the padded image and the size to crop back
/// to after detection ([`remove_pad`]).
pub fn resize_image_with_pad(img: &ImageBuf, resolution: usize) -> (ImageBuf, (usize, usize)) {
    let rgb = hwc3(img);
    let k = resolution as f64 / rgb.width.min(rgb.height) as f64;
    let (wt, ht) = (
        (rgb.width as f64 * k).round() as usize,
        (rgb.height as f64 * k).round() as usize,
    );
    let interp = if k > 1.0 { Interp::Cubic } else { Interp::Area };
    let r = resize(&rgb, wt.max(1), ht.max(1), interp);
    let (pw, ph) = (wt.div_ceil(64) * 64, ht.div_ceil(64) * 64);
    let mut data = Vec::with_capacity(pw * ph * 3);
    for y in 0..ph {
        for x in 0..pw {
            data.extend_from_slice(r.pixel(x.min(r.width - 1), y.min(r.height - 1)));
        }
    }
    (
        ImageBuf {
            width: pw,
            height: ph,
            channels: 3,
            data,
        },
        (wt, ht),
    )
}

/// Crop a detected map back to the un-padded size.
pub fn remove_pad(img: &ImageBuf, (w, h): (usize, usize)) -> ImageBuf {
    let (w, h) = (w.min(img.width), h.min(img.height));
    let mut data = Vec::with_capacity(w * h * img.channels);
    for y in 0..h {
        let row = (y * img.width) * img.channels;
        data.extend_from_slice(&img.data[row..row + w * img.channels]);
    }
    ImageBuf {
        width: w,
        height: h,
        channels: img.channels,
        data,
    }
}

#[cfg(test)]
mod webui_tests {
    use super::*;

    #[test]
    fn pixel_perfect_and_padding() {
        // 1024x768 photo for a 512x512 generation: crop fit uses the larger ratio
        assert_eq!(pixel_perfect_resolution(1024, 768, 512, 512, false), 512);
        assert_eq!(pixel_perfect_resolution(1024, 768, 512, 512, true), 384);
        assert_eq!(pixel_perfect_resolution(600, 400, 768, 512, false), 512);
        let (p, size) = resize_image_with_pad(&ImageBuf::filled(150, 100, 3, 5), 100);
        assert_eq!(size, (150, 100));
        assert_eq!((p.width, p.height), (192, 128));
        assert!(p.data.iter().all(|&v| v == 5));
        let back = remove_pad(&p, size);
        assert_eq!((back.width, back.height), (150, 100));
    }
}
