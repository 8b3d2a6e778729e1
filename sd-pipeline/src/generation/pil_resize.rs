//! PIL's `Image.resize` for 8-bit images (libImaging/Resample.c): separable convolution with
//! the filter stretched by the scale when shrinking, coefficients normalised and turned into
//! 22-bit fixed point, horizontal pass then vertical, each rounded back to bytes. torch's
//! uint8 antialiased `interpolate` (so torchvision's resize, transformers' CLIP processor)
//! computes the same bytes.

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

/// Per output index: the first input index and the fixed-point weights (`precompute_coeffs`
/// + `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize, filter: PilFilter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u64 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (f - 0.5) as i32
                    } else {
                        (f + 0.5) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    let v = v >> PRECISION_BITS;
    v.clamp(0, 255) as u8
}

/// Resize an interleaved 8-bit image (`channels` per pixel) as PIL does.
pub fn pil_resize(
    data: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    new_width: usize,
    new_height: usize,
    filter: PilFilter,
) -> Vec<u8> {
    let mut cur = data.to_vec();
    let mut w = width;
    if new_width != width {
        let co = coefficients(width, new_width, filter);
        let mut out = vec![0u8; new_width * height * channels];
        for y in 0..height {
            for (xx, (xmin, k)) in co.iter().enumerate() {
                for c in 0..channels {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        ss += cur[(y * w + xmin + i) * channels + c] as i64 * kv as i64;
                    }
                    out[(y * new_width + xx) * channels + c] = clip8(ss);
                }
            }
        }
        cur = out;
        w = new_width;
    }
    if new_height != height {
        let co = coefficients(height, new_height, filter);
        let mut out = vec![0u8; w * new_height * channels];
        for (yy, (ymin, k)) in co.iter().enumerate() {
            for x in 0..w {
                for c in 0..channels {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kv) in k.iter().enumerate() {
                        ss += cur[((ymin + i) * w + x) * channels + c] as i64 * kv as i64;
                    }
                    out[(yy * w + x) * channels + c] = clip8(ss);
                }
            }
        }
        cur = out;
    }
    cur
}
