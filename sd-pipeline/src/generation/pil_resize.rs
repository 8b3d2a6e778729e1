//! PIL's `Image.resize` for 8-bit images (libImaging/Resample.c): separable convolution with
//! the filter stretched by the scale when shrinking, coefficients normalised and turned into
//! fixed point, horizontal pass then vertical, each rounded back to bytes. PIL's fixed point
//! has 22 bits; torch's uint8 antialiased `interpolate` (so torchvision's resize and
//! transformers' CLIP processor) the same algorithm with int16 weights at the most bits the
//! largest weight allows (`_compute_index_ranges_int16_weights`), which rounds some bytes
//! differently: [`Fixed`] picks one.

/// PIL's filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PilFilter {
    /// `Image.BICUBIC` (a = -0.5, support 2).
    Bicubic,
    /// `Image.LANCZOS` (support 3).
    Lanczos,
}

impl PilFilter {
    fn support(self) -> f64 {
        match self {
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                let sinc = |x: f64| {
                    if x == 0.0 {
                        1.0
                    } else {
                        let x = x * std::f64::consts::PI;
                        x.sin() / x
                    }
                };
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Whose fixed-point weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixed {
    /// PIL: 22 bits.
    Pil,
    /// torch uint8: int16 weights, the most bits below 2^15 for the largest weight.
    Torch,
}

/// Per output index: the first input index and the fixed-point weights (`precompute_coeffs`
/// + `normalize_coeffs_8bpc`), and the bits of the fixed point.
fn coefficients(
    in_size: usize,
    out_size: usize,
    filter: PilFilter,
    fixed: Fixed,
) -> (Vec<(usize, Vec<i32>)>, u32) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let weights: Vec<(usize, Vec<f64>)> = (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let w = w
                .iter()
                .map(|&v| if total != 0.0 { v / total } else { v })
                .collect();
            (xmin, w)
        })
        .collect();
    let bits = match fixed {
        Fixed::Pil => PRECISION_BITS,
        Fixed::Torch => {
            let max = weights
                .iter()
                .flat_map(|(_, w)| w.iter().copied())
                .fold(f64::MIN, f64::max);
            let mut p = 0;
            while p < 22 && ((0.5 + max * (1u64 << (p + 1)) as f64) as i64) < (1 << 15) {
                p += 1;
            }
            p
        }
    };
    let one = (1u64 << bits) as f64;
    let k = weights
        .into_iter()
        .map(|(xmin, w)| {
            let k = w
                .iter()
                .map(|&v| {
                    let f = v * one;
                    if f < 0.0 {
                        (f - 0.5) as i32
                    } else {
                        (f + 0.5) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect();
    (k, bits)
}

fn clip8(v: i64, bits: u32) -> u8 {
    (v >> bits).clamp(0, 255) as u8
}

/// Resize an interleaved 8-bit image (`channels` per pixel) as PIL (or torch) does.
#[allow(clippy::too_many_arguments)]
pub fn pil_resize(
    data: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    new_width: usize,
    new_height: usize,
    filter: PilFilter,
    fixed: Fixed,
) -> Vec<u8> {
    let mut cur = data.to_vec();
    let mut w = width;
    if new_width != width {
        let (co, bits) = coefficients(width, new_width, filter, fixed);
        let mut out = vec![0u8; new_width * height * channels];
        for y in 0..height {
            for (xx, (xmin, k)) in co.iter().enumerate() {
                for c in 0..channels {
                    let mut ss: i64 = 1 << (bits - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        ss += cur[(y * w + xmin + i) * channels + c] as i64 * kv as i64;
                    }
                    out[(y * new_width + xx) * channels + c] = clip8(ss, bits);
                }
            }
        }
        cur = out;
        w = new_width;
    }
    if new_height != height {
        let (co, bits) = coefficients(height, new_height, filter, fixed);
        let mut out = vec![0u8; w * new_height * channels];
        for (yy, (ymin, k)) in co.iter().enumerate() {
            for x in 0..w {
                for c in 0..channels {
                    let mut ss: i64 = 1 << (bits - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        ss += cur[((ymin + i) * w + x) * channels + c] as i64 * kv as i64;
                    }
                    out[(yy * w + x) * channels + c] = clip8(ss, bits);
                }
            }
        }
        cur = out;
    }
    cur
}
