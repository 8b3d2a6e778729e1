//! A1111's image steps around inpainting (`modules/processing.py`,
//! `StableDiffusionProcessingImg2Img.init` and `apply_overlay`; `modules/masking.py`): the mask
//! binarised, inverted and blurred, "only masked" (crop the masked region with padding, inpaint
//! it at the generation size, paste it back), and the original pasted over the result outside
//! the mask. The denoising itself stays diffusers' inpainting; these steps only change the
//! images around it. All off by default (`sdctl generate` as diffusers); the server turns them
//! on with A1111's values.

use image::{imageops, GrayImage, Rgb, RgbImage};

/// The settings keys of these steps (config keys, `sdctl generate` flags).
pub const KEYS: [&str; 6] = [
    "mask_blur",
    "invert_mask",
    "inpaint_area",
    "inpaint_padding",
    "mask_overlay",
    "inpaint_fill",
];

/// The steps to take; the default takes none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Inpaint {
    /// Gaussian blur of the mask, sigma in pixels (A1111's `mask_blur`; 0: none).
    pub mask_blur: u32,
    /// Repaint where the mask is black (A1111's "Inpaint not masked").
    pub invert_mask: bool,
    /// Inpaint only the masked region, grown by this many pixels (A1111's "Only masked",
    /// `inpaint_full_res` + `inpaint_full_res_padding`); `None`: the whole picture.
    pub only_masked_padding: Option<u32>,
    /// Paste the original over the result where the mask is black (A1111 always does).
    pub overlay: bool,
    /// What the masked part starts from (A1111's `inpainting_fill`).
    pub fill: Fill,
}

/// A1111's `inpainting_fill`: what the masked part of the init image starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fill {
    /// Colours of the surroundings, blurred in (`masking.fill`; A1111's 0, "fill").
    Fill,
    /// The init image as it is (1, "original"; diffusers).
    #[default]
    Original,
    /// The initial noise in the latents (2, "latent noise").
    LatentNoise,
    /// Zero latents (3, "latent nothing").
    LatentNothing,
}

impl Fill {
    pub const NAMES: [&'static str; 4] = ["fill", "original", "latent-noise", "latent-nothing"];

    /// A1111's number for it (`inpainting_fill`).
    pub fn from_a1111(n: i64) -> Option<Self> {
        [
            Fill::Fill,
            Fill::Original,
            Fill::LatentNoise,
            Fill::LatentNothing,
        ]
        .get(usize::try_from(n).ok()?)
        .copied()
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// A1111's infotext name ("Masked content").
    fn a1111_name(self) -> &'static str {
        ["fill", "original", "latent noise", "latent nothing"][self as usize]
    }

    /// What the denoising loop does to the init latents under the mask.
    pub fn latent(self) -> sd_pipeline::LatentFill {
        match self {
            Fill::LatentNoise => sd_pipeline::LatentFill::Noise,
            Fill::LatentNothing => sd_pipeline::LatentFill::Nothing,
            _ => sd_pipeline::LatentFill::Original,
        }
    }
}

impl std::str::FromStr for Fill {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::NAMES
            .iter()
            .position(|n| *n == s)
            .and_then(|i| Self::from_a1111(i as i64))
            .ok_or_else(|| format!("{s:?} is not one of {}", Self::NAMES.join(", ")))
    }
}

impl Inpaint {
    /// No step to take: the mask and the images go to the engine as they are.
    pub fn is_plain(&self) -> bool {
        *self == Self::default()
    }

    /// The infotext fields A1111 writes for these steps.
    pub fn infotext(&self) -> Vec<(String, String)> {
        let mut f = Vec::new();
        if self.mask_blur > 0 {
            f.push(("Mask blur".into(), self.mask_blur.to_string()));
        }
        if self.invert_mask {
            f.push(("Mask mode".into(), "Inpaint not masked".into()));
        }
        if self.fill != Fill::Original {
            f.push(("Masked content".into(), self.fill.a1111_name().into()));
        }
        if let Some(p) = self.only_masked_padding {
            f.push(("Inpaint area".into(), "Only masked".into()));
            f.push(("Masked area padding".into(), p.to_string()));
        }
        f
    }
}

/// The images the engine gets, and how its result goes back.
pub struct Prepared {
    /// The init image at the generation size.
    pub init: RgbImage,
    /// The mask at the generation size (`None`: the mask was empty; plain img2img, as A1111).
    pub mask: Option<GrayImage>,
    /// The original image, for pasting the crop into and for the overlay.
    original: Option<RgbImage>,
    /// The mask the original is pasted through (`mask_for_overlay`), at the original's size.
    overlay_mask: Option<GrayImage>,
    /// Where the generated crop goes in the original: x, y, width, height.
    paste: Option<(u32, u32, u32, u32)>,
}

/// PIL's `convert("L")`: `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`.
fn luma(p: &Rgb<u8>) -> u8 {
    let [r, g, b] = p.0;
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// `masking.create_binary_mask`: the alpha channel of an image with transparency, else its
/// grey values; 255 above 128, else 0.
pub fn binary_mask(img: &image::DynamicImage) -> GrayImage {
    let grey = match img {
        image::DynamicImage::ImageLuma8(g) => g.clone(),
        i if i.color().has_alpha() && i.to_rgba8().pixels().any(|p| p.0[3] != 255) => {
            let rgba = i.to_rgba8();
            GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                image::Luma([rgba.get_pixel(x, y).0[3]])
            })
        }
        i => {
            let rgb = i.to_rgb8();
            GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                image::Luma([luma(rgb.get_pixel(x, y))])
            })
        }
    };
    GrayImage::from_fn(grey.width(), grey.height(), |x, y| {
        image::Luma([if grey.get_pixel(x, y).0[0] > 128 {
            255
        } else {
            0
        }])
    })
}

/// `cv2.GaussianBlur(mask, (k, 1), sigma)` then `(1, k)` with `k = 2 * int(2.5 * sigma + 0.5) + 1`
/// (A1111's mask blur), reflect-101 borders, in floating point (OpenCV's 8-bit fixed point
/// may differ by one grey level).
pub fn blur(mask: &GrayImage, sigma: u32) -> GrayImage {
    if sigma == 0 {
        return mask.clone();
    }
    let s = sigma as f64;
    let k = 2 * ((2.5 * s + 0.5) as usize) + 1;
    let half = (k / 2) as isize;
    let mut kernel: Vec<f64> = (0..k)
        .map(|i| {
            let d = i as f64 - half as f64;
            (-(d * d) / (2.0 * s * s)).exp()
        })
        .collect();
    let sum: f64 = kernel.iter().sum();
    kernel.iter_mut().for_each(|v| *v /= sum);
    let (w, h) = (mask.width() as isize, mask.height() as isize);
    let reflect = |i: isize, n: isize| -> usize {
        if n == 1 {
            return 0;
        }
        let period = 2 * (n - 1);
        let m = i.rem_euclid(period);
        (if m < n { m } else { period - m }) as usize
    };
    let src: Vec<f64> = mask.pixels().map(|p| p.0[0] as f64).collect();
    let mut tmp = vec![0f64; src.len()];
    for y in 0..h {
        for x in 0..w {
            tmp[(y * w + x) as usize] = (0..k)
                .map(|i| kernel[i] * src[(y * w) as usize + reflect(x + i as isize - half, w)])
                .sum();
        }
    }
    GrayImage::from_fn(w as u32, h as u32, |x, y| {
        let (x, y) = (x as isize, y as isize);
        let v: f64 = (0..k)
            .map(|i| kernel[i] * tmp[reflect(y + i as isize - half, h) * w as usize + x as usize])
            .sum();
        image::Luma([v.round().clamp(0.0, 255.0) as u8])
    })
}

/// `masking.get_crop_region_v2`: the box of the mask's non-zero pixels (x1, y1, x2, y2; ends
/// exclusive), grown by `pad` within the image.
pub fn crop_region(mask: &GrayImage, pad: u32) -> Option<(u32, u32, u32, u32)> {
    let (mut x1, mut y1, mut x2, mut y2) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] != 0 {
            x1 = x1.min(x);
            y1 = y1.min(y);
            x2 = x2.max(x + 1);
            y2 = y2.max(y + 1);
        }
    }
    if x1 == u32::MAX {
        return None;
    }
    Some((
        x1.saturating_sub(pad),
        y1.saturating_sub(pad),
        (x2 + pad).min(mask.width()),
        (y2 + pad).min(mask.height()),
    ))
}

/// `masking.expand_crop_region`: the region grown to the generation's aspect ratio.
pub fn expand_crop_region(
    region: (u32, u32, u32, u32),
    width: usize,
    height: usize,
    image_width: u32,
    image_height: u32,
) -> (u32, u32, u32, u32) {
    let (x1, y1, x2, y2) = (
        region.0 as i64,
        region.1 as i64,
        region.2 as i64,
        region.3 as i64,
    );
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio = width as f64 / height as f64;
    if ratio_crop > ratio {
        let diff = ((x2 - x1) as f64 / ratio - (y2 - y1) as f64) as i64;
        let (y1, y2) = grow(y1, y2, diff, image_height as i64);
        (x1 as u32, y1 as u32, x2 as u32, y2 as u32)
    } else {
        let diff = ((y2 - y1) as f64 * ratio - (x2 - x1) as f64) as i64;
        let (x1, x2) = grow(x1, x2, diff, image_width as i64);
        (x1 as u32, y1 as u32, x2 as u32, y2 as u32)
    }
}

/// One axis of `expand_crop_region`: `[lo, hi)` grown by `diff` (half before, Python's `//`),
/// shifted back inside `[0, limit]`.
fn grow(lo: i64, hi: i64, diff: i64, limit: i64) -> (i64, i64) {
    let (mut lo, mut hi) = (lo - diff.div_euclid(2), hi + diff - diff.div_euclid(2));
    if hi >= limit {
        let d = hi - limit;
        hi -= d;
        lo -= d;
    }
    if lo < 0 {
        hi -= lo;
        lo = 0;
    }
    (lo, hi.min(limit))
}

fn resize<P: image::Pixel<Subpixel = u8> + 'static>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    w: u32,
    h: u32,
) -> image::ImageBuffer<P, Vec<u8>> {
    if img.dimensions() == (w, h) {
        img.clone()
    } else {
        // PIL's Lanczos in A1111; this Lanczos3 is close, not bit-identical
        imageops::resize(img, w, h, imageops::FilterType::Lanczos3)
    }
}

/// `images.resize_image(2, ...)` "Resize and fill": scaled to fit inside, centred, the empty
/// bands filled with the edge rows or columns stretched.
fn resize_and_fill<P: image::Pixel<Subpixel = u8> + 'static>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    w: u32,
    h: u32,
) -> image::ImageBuffer<P, Vec<u8>> {
    let (iw, ih) = img.dimensions();
    let ratio = w as f64 / h as f64;
    let src_ratio = iw as f64 / ih as f64;
    let src_w = if ratio < src_ratio { w } else { iw * h / ih };
    let src_h = if ratio >= src_ratio { h } else { ih * w / iw };
    let r = resize(img, src_w.max(1), src_h.max(1));
    let (ox, oy) = (
        (w / 2).saturating_sub(src_w / 2),
        (h / 2).saturating_sub(src_h / 2),
    );
    image::ImageBuffer::from_fn(w, h, |x, y| {
        let sx = x.saturating_sub(ox).min(r.width() - 1);
        let sy = y.saturating_sub(oy).min(r.height() - 1);
        *r.get_pixel(sx, sy)
    })
}

/// `images.resize_image(1, ...)` "Crop and resize": scaled to cover, centre cropped.
fn crop_and_resize(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (iw, ih) = img.dimensions();
    let ratio = w as f64 / h as f64;
    let src_ratio = iw as f64 / ih as f64;
    let src_w = if ratio > src_ratio { w } else { iw * h / ih };
    let src_h = if ratio <= src_ratio { h } else { ih * w / iw };
    let r = resize(img, src_w.max(1), src_h.max(1));
    let (ox, oy) = (
        (src_w / 2).saturating_sub(w / 2),
        (src_h / 2).saturating_sub(h / 2),
    );
    imageops::crop_imm(&r, ox, oy, w.min(src_w), h.min(src_h)).to_image()
}

/// PIL's `GaussianBlur(radius)`: three box blurs of the extended-box radius
/// (`_gaussian_blur_radius`, Gwosdek et al.), edges repeated, each pass rounded to 8 bits.
fn pil_gaussian_blur(px: &mut [[u8; 4]], w: usize, h: usize, radius: f64) {
    if radius <= 0.0 {
        return;
    }
    let passes = 3.0;
    let sigma2 = radius * radius / passes;
    let big_l = (12.0 * sigma2 + 1.0).sqrt();
    let l = ((big_l - 1.0) / 2.0).floor();
    let a =
        (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    let (li, frac) = (l as isize, a);
    let norm = 2.0 * (l + a) + 1.0;
    let line = |get: &dyn Fn(usize) -> [u8; 4], n: usize| -> Vec<[u8; 4]> {
        let at = |i: isize| get(i.clamp(0, n as isize - 1) as usize);
        (0..n as isize)
            .map(|i| {
                let mut acc = [0f64; 4];
                for d in -li..=li {
                    let p = at(i + d);
                    for c in 0..4 {
                        acc[c] += p[c] as f64;
                    }
                }
                let (p0, p1) = (at(i - li - 1), at(i + li + 1));
                std::array::from_fn(|c| {
                    let v = (acc[c] + frac * (p0[c] as f64 + p1[c] as f64)) / norm;
                    v.round().clamp(0.0, 255.0) as u8
                })
            })
            .collect()
    };
    for _ in 0..3 {
        for y in 0..h {
            let row = line(&|x| px[y * w + x], w);
            px[y * w..(y + 1) * w].copy_from_slice(&row);
        }
        for x in 0..w {
            let col = line(&|y| px[y * w + x], h);
            for (y, p) in col.into_iter().enumerate() {
                px[y * w + x] = p;
            }
        }
    }
}

/// `masking.fill`: the masked part of `image` replaced by its surroundings' colours, blurred
/// in at decreasing radii (A1111's "fill").
pub fn fill(image: &RgbImage, mask: &GrayImage) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    // premultiplied RGBa of the unmasked pixels (alpha 255 - mask)
    let masked: Vec<[u8; 4]> = image
        .pixels()
        .zip(mask.pixels())
        .map(|(p, m)| {
            let a = 255 - m.0[0] as u32;
            let pre = |v: u8| ((v as u32 * a + 127) / 255) as u8;
            [pre(p.0[0]), pre(p.0[1]), pre(p.0[2]), a as u8]
        })
        .collect();
    let mut out = vec![[0u8; 4]; w * h];
    for (radius, repeats) in [
        (256.0, 1),
        (64.0, 1),
        (16.0, 2),
        (4.0, 4),
        (2.0, 2),
        (0.0, 1),
    ] {
        let mut blurred = masked.clone();
        pil_gaussian_blur(&mut blurred, w, h, radius);
        for _ in 0..repeats {
            for (o, b) in out.iter_mut().zip(&blurred) {
                // un-premultiply (RGBa -> RGBA), then alpha-composite over
                let sa = b[3] as u32;
                if sa == 0 {
                    continue;
                }
                let src: [u32; 3] = std::array::from_fn(|c| (b[c] as u32 * 255 + sa / 2) / sa);
                let da = o[3] as u32;
                let out_a = sa * 255 + da * (255 - sa);
                for c in 0..3 {
                    let num = src[c].min(255) * sa * 255 + o[c] as u32 * da * (255 - sa);
                    o[c] = ((num + out_a / 2) / out_a) as u8;
                }
                o[3] = ((out_a + 127) / 255) as u8;
            }
        }
    }
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let p = out[y as usize * w + x as usize];
        Rgb([p[0], p[1], p[2]])
    })
}

/// The init image and mask (both as read from their files) prepared for a generation of
/// `width` x `height`.
pub fn prepare(
    init: &image::DynamicImage,
    mask: &image::DynamicImage,
    width: usize,
    height: usize,
    steps: &Inpaint,
) -> Prepared {
    let (w, h) = (width as u32, height as u32);
    let init = init.to_rgb8();
    let mut m = binary_mask(mask);
    if steps.invert_mask {
        imageops::invert(&mut m);
    }
    let m = blur(&m, steps.mask_blur);
    if let Some(pad) = steps.only_masked_padding {
        // the mask at the init image's size, as A1111 crops both in the image's pixels
        let m = resize(&m, init.width(), init.height());
        let Some(region) = crop_region(&m, pad) else {
            return Prepared {
                init: resize(&init, w, h),
                mask: None,
                original: None,
                overlay_mask: None,
                paste: None,
            };
        };
        let (x1, y1, x2, y2) = expand_crop_region(region, width, height, m.width(), m.height());
        let (cw, ch) = (x2 - x1, y2 - y1);
        let crop_mask = imageops::crop_imm(&m, x1, y1, cw, ch).to_image();
        let crop_init = imageops::crop_imm(&init, x1, y1, cw, ch).to_image();
        let (crop_init, crop_mask) = (
            resize_and_fill(&crop_init, w, h),
            resize_and_fill(&crop_mask, w, h),
        );
        return Prepared {
            init: match steps.fill {
                Fill::Fill => fill(&crop_init, &crop_mask),
                _ => crop_init,
            },
            mask: Some(crop_mask),
            overlay_mask: steps.overlay.then_some(m),
            original: Some(init),
            paste: Some((x1, y1, cw, ch)),
        };
    }
    let m = resize(&m, w, h);
    let init = resize(&init, w, h);
    // the overlay mask is doubled so that the blur's outer half shows the original
    let overlay_mask = GrayImage::from_fn(w, h, |x, y| {
        image::Luma([m.get_pixel(x, y).0[0].saturating_mul(2)])
    });
    Prepared {
        original: steps.overlay.then(|| init.clone()),
        overlay_mask: steps.overlay.then_some(overlay_mask),
        init: match steps.fill {
            Fill::Fill => fill(&init, &m),
            _ => init,
        },
        mask: Some(m),
        paste: None,
    }
}

impl Prepared {
    /// A generated image back into the original: the crop pasted where it came from ("only
    /// masked", `uncrop`), then the original over it outside the mask (`apply_overlay`).
    pub fn finish(&self, generated: RgbImage) -> RgbImage {
        let base = match (self.paste, &self.original) {
            (Some((x, y, w, h)), Some(original)) => {
                let mut base = original.clone();
                imageops::replace(
                    &mut base,
                    &crop_and_resize(&generated, w, h),
                    x as i64,
                    y as i64,
                );
                base
            }
            _ => generated,
        };
        let (Some(original), Some(mask)) = (&self.original, &self.overlay_mask) else {
            return base;
        };
        // PIL's alpha_composite of the original, alpha 255 - mask, over the opaque result
        RgbImage::from_fn(base.width(), base.height(), |x, y| {
            let a = 255 - mask.get_pixel(x, y).0[0] as u32;
            let (src, dst) = (original.get_pixel(x, y).0, base.get_pixel(x, y).0);
            Rgb(std::array::from_fn(|c| {
                ((src[c] as u32 * a + dst[c] as u32 * (255 - a) + 127) / 255) as u8
            }))
        })
    }

    /// The size of the finished image (the original's, when only the masked part was made).
    pub fn output_size(&self) -> Option<(u32, u32)> {
        self.paste
            .and(self.original.as_ref())
            .map(|o| o.dimensions())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_takes_the_surroundings_colour_and_keeps_the_unmasked_pixels() {
        let mut img = RgbImage::from_pixel(40, 20, Rgb([200, 40, 10]));
        let mut m = GrayImage::new(40, 20);
        for y in 5..15 {
            for x in 15..25 {
                img.put_pixel(x, y, Rgb([0, 255, 0]));
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        let f = fill(&img, &m);
        // the unmasked pixels keep their colour (radius 0 composites them last), the green
        // hole takes the surroundings' red
        assert_eq!(f.get_pixel(2, 2).0, [200, 40, 10]);
        let c = f.get_pixel(20, 10).0;
        assert!(
            (c[0] as i32 - 200).abs() <= 2 && c[1] < 45 && (c[2] as i32 - 10).abs() <= 2,
            "{c:?}"
        );
        // one box pass of radius 0 blur changes nothing
        let mut px = vec![[1, 2, 3, 4], [5, 6, 7, 8]];
        pil_gaussian_blur(&mut px, 2, 1, 0.0);
        assert_eq!(px, vec![[1, 2, 3, 4], [5, 6, 7, 8]]);
    }

    #[test]
    fn a1111_crop_region_and_its_expansion() {
        let mut m = GrayImage::new(100, 80);
        for y in 30..40 {
            for x in 20..60 {
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        assert_eq!(crop_region(&m, 0), Some((20, 30, 60, 40)));
        assert_eq!(crop_region(&m, 8), Some((12, 22, 68, 48)));
        assert_eq!(crop_region(&GrayImage::new(4, 4), 3), None);
        // 40x10 to a square: grown by 30 rows, 15 above and 15 below
        assert_eq!(
            expand_crop_region((20, 30, 60, 40), 64, 64, 100, 80),
            (20, 15, 60, 55)
        );
        // against the bottom edge: shifted up
        assert_eq!(
            expand_crop_region((20, 70, 60, 80), 64, 64, 100, 80),
            (20, 40, 60, 80)
        );
        // 10 wide, 40 high to 2:1 width: 70 more columns, from x = -30 shifted to 0
        assert_eq!(
            expand_crop_region((5, 0, 15, 40), 128, 64, 100, 80),
            (0, 0, 80, 40)
        );
    }

    #[test]
    fn blur_matches_opencvs_kernel_on_a_step() {
        // sigma 1: k = 2 * int(3.0) + 1 = 7, weights exp(-d^2 / 2) normalised
        let mut m = GrayImage::new(9, 1);
        m.put_pixel(4, 0, image::Luma([255]));
        let b = blur(&m, 1);
        let w: Vec<f64> = (-3..=3)
            .map(|d: i32| (-(d * d) as f64 / 2.0).exp())
            .collect();
        let s: f64 = w.iter().sum();
        for (i, wi) in w.iter().enumerate() {
            // one row: the vertical pass sees the same row reflected, the weights sum to 1
            assert_eq!(
                b.get_pixel(1 + i as u32, 0).0[0],
                (255.0 * wi / s).round() as u8
            );
        }
        assert_eq!(b.get_pixel(0, 0).0[0], 0);
    }

    #[test]
    fn binary_mask_is_pils_grey_over_128_and_overlay_keeps_the_unmasked_original() {
        let mut rgb = RgbImage::new(4, 1);
        rgb.put_pixel(0, 0, Rgb([129, 129, 129]));
        rgb.put_pixel(1, 0, Rgb([128, 128, 128]));
        rgb.put_pixel(2, 0, Rgb([255, 0, 0])); // L = 76
        rgb.put_pixel(3, 0, Rgb([255, 255, 255]));
        let m = binary_mask(&image::DynamicImage::ImageRgb8(rgb.clone()));
        let v: Vec<u8> = m.pixels().map(|p| p.0[0]).collect();
        assert_eq!(v, [255, 0, 0, 255]);

        let steps = Inpaint {
            overlay: true,
            ..Inpaint::default()
        };
        let init = image::DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 1, Rgb([10, 20, 30])));
        let p = prepare(&init, &image::DynamicImage::ImageRgb8(rgb), 4, 1, &steps);
        let out = p.finish(RgbImage::from_pixel(4, 1, Rgb([200, 200, 200])));
        assert_eq!(out.get_pixel(0, 0).0, [200, 200, 200], "masked: generated");
        assert_eq!(
            out.get_pixel(1, 0).0,
            [10, 20, 30],
            "unmasked: the original"
        );
    }

    #[test]
    fn only_masked_inpaints_the_crop_and_pastes_it_back() {
        let init = RgbImage::from_pixel(32, 32, Rgb([10, 20, 30]));
        let mut mask = GrayImage::new(32, 32);
        for y in 8..16 {
            for x in 8..16 {
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        let steps = Inpaint {
            only_masked_padding: Some(4),
            overlay: true,
            ..Inpaint::default()
        };
        let p = prepare(
            &image::DynamicImage::ImageRgb8(init),
            &image::DynamicImage::ImageLuma8(mask),
            64,
            64,
            &steps,
        );
        assert_eq!(p.paste, Some((4, 4, 16, 16)));
        assert_eq!(p.init.dimensions(), (64, 64));
        assert_eq!(p.output_size(), Some((32, 32)));
        let out = p.finish(RgbImage::from_pixel(64, 64, Rgb([250, 250, 250])));
        assert_eq!(out.dimensions(), (32, 32));
        assert_eq!(out.get_pixel(12, 12).0, [250, 250, 250]);
        assert_eq!(out.get_pixel(2, 2).0, [10, 20, 30]);
        assert_eq!(
            out.get_pixel(5, 5).0,
            [10, 20, 30],
            "inside the crop, outside the mask"
        );
    }
}
