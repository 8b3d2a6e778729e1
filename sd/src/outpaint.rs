//! Outpainting: the init image padded on its sides (filled from its edge, mirrored, or with
//! noise), a mask that repaints the new border, then inpainting (the model's 9-channel path
//! where it has one) with A1111's mask blur as the feather and its overlay keeping the
//! original pixels.

use std::fmt;
use std::str::FromStr;

use image::{GrayImage, Luma, Rgb, RgbImage};

/// What the new border starts as before it is repainted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PadFill {
    /// The nearest edge pixel, stretched out.
    #[default]
    Edge,
    /// The image reflected at its edge (numpy's `reflect`).
    Mirror,
    /// Uniform random colours from the seed.
    Noise,
}

impl PadFill {
    pub const NAMES: [&'static str; 3] = ["edge", "mirror", "noise"];
}

impl fmt::Display for PadFill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Edge => "edge",
            Self::Mirror => "mirror",
            Self::Noise => "noise",
        })
    }
}

impl FromStr for PadFill {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_lowercase().as_str() {
            "edge" => Ok(Self::Edge),
            "mirror" => Ok(Self::Mirror),
            "noise" => Ok(Self::Noise),
            _ => Err(format!("{s:?}: use edge, mirror or noise")),
        }
    }
}

/// Pixels added on each side, and how they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outpaint {
    pub left: u32,
    pub right: u32,
    pub top: u32,
    pub bottom: u32,
    pub fill: PadFill,
    /// The mask's feather: A1111's mask blur (sigma, pixels) when the job sets none.
    pub feather: u32,
}

impl Outpaint {
    /// `LEFT,RIGHT,TOP,BOTTOM` in pixels.
    pub fn parse(s: &str) -> Result<Self, String> {
        let v: Vec<u32> = s
            .split(',')
            .map(|p| p.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("{s:?} is not LEFT,RIGHT,TOP,BOTTOM in pixels"))?;
        let [left, right, top, bottom] = v[..] else {
            return Err(format!("{s:?}: give four numbers, LEFT,RIGHT,TOP,BOTTOM"));
        };
        if left + right + top + bottom == 0 || [left, right, top, bottom].iter().any(|&p| p > 4096)
        {
            return Err(format!(
                "{s:?}: pad at least one side, each at most 4096 pixels"
            ));
        }
        Ok(Self {
            left,
            right,
            top,
            bottom,
            fill: PadFill::Edge,
            feather: 8,
        })
    }

    /// The padded size of a `w` x `h` image.
    pub fn size(&self, w: u32, h: u32) -> (u32, u32) {
        (w + self.left + self.right, h + self.top + self.bottom)
    }

    /// The padded image and its mask (white: the new border, to repaint).
    pub fn pad(&self, img: &RgbImage, seed: u64) -> (RgbImage, GrayImage) {
        let (w, h) = img.dimensions();
        let (pw, ph) = self.size(w, h);
        let mut rng = sd_pipeline::rng::TorchRng::new(seed);
        let mut out = RgbImage::new(pw, ph);
        let mut mask = GrayImage::new(pw, ph);
        let reflect = |x: i64, n: u32| -> u32 {
            if n == 1 {
                return 0;
            }
            let period = 2 * (n as i64 - 1);
            let m = x.rem_euclid(period);
            (if m < n as i64 { m } else { period - m }) as u32
        };
        for y in 0..ph {
            for x in 0..pw {
                let (sx, sy) = (x as i64 - self.left as i64, y as i64 - self.top as i64);
                let inside = (0..w as i64).contains(&sx) && (0..h as i64).contains(&sy);
                let px = if inside {
                    *img.get_pixel(sx as u32, sy as u32)
                } else {
                    mask.put_pixel(x, y, Luma([255]));
                    match self.fill {
                        PadFill::Edge => *img.get_pixel(
                            sx.clamp(0, w as i64 - 1) as u32,
                            sy.clamp(0, h as i64 - 1) as u32,
                        ),
                        PadFill::Mirror => *img.get_pixel(reflect(sx, w), reflect(sy, h)),
                        PadFill::Noise => {
                            let v = rng.next_u32();
                            Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
                        }
                    }
                };
                out.put_pixel(x, y, px);
            }
        }
        (out, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_and_masks_the_new_border() {
        let img = RgbImage::from_fn(3, 2, |x, y| Rgb([(10 * x + y) as u8, 0, 0]));
        let mut o = Outpaint::parse("2,1,0,1").unwrap();
        assert_eq!(o.size(3, 2), (6, 3));
        let (p, m) = o.pad(&img, 1);
        assert_eq!(p.dimensions(), (6, 3));
        // the original sits at (2, 0) and is not masked
        assert_eq!(p.get_pixel(2, 0).0[0], 0);
        assert_eq!(p.get_pixel(4, 1).0[0], 21);
        assert_eq!(m.get_pixel(3, 1).0[0], 0);
        assert_eq!(m.get_pixel(0, 0).0[0], 255);
        assert_eq!(m.get_pixel(3, 2).0[0], 255);
        // edge: the nearest pixel; mirror: reflected without repeating the edge
        assert_eq!(p.get_pixel(0, 1).0[0], 1);
        o.fill = PadFill::Mirror;
        let (p, _) = o.pad(&img, 1);
        assert_eq!(p.get_pixel(1, 0).0[0], 10); // x = -1 -> 1
        assert_eq!(p.get_pixel(0, 0).0[0], 20); // x = -2 -> 2
        assert_eq!(p.get_pixel(5, 0).0[0], 10); // x = 3 -> 1
        assert_eq!(p.get_pixel(2, 2).0[0], 0); // y = 2 -> 0
        o.fill = PadFill::Noise;
        let (a, _) = o.pad(&img, 1);
        let (b, _) = o.pad(&img, 2);
        assert_ne!(a, b);
        assert!(Outpaint::parse("1,2,3").is_err());
        assert!(Outpaint::parse("0,0,0,0").is_err());
        assert!("blur".parse::<PadFill>().is_err());
    }
}
