//! Latent resizing as `torch.nn.functional.interpolate` does it (ATen's CPU `upsample_*`
//! kernels, `align_corners=False`), for A1111's latent upscalers in the hires fix
//! (`shared.latent_upscale_modes`): bilinear and bicubic, with or without antialiasing, nearest
//! and nearest-exact.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Result, Tensor};

/// A1111's latent upscalers (the hires fix's "Latent ..." choices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentUpscale {
    /// "Latent": bilinear.
    Bilinear,
    /// "Latent (antialiased)".
    BilinearAntialias,
    /// "Latent (bicubic)": A = -0.75.
    Bicubic,
    /// "Latent (bicubic antialiased)": PIL's cubic, A = -0.5, normalised weights.
    BicubicAntialias,
    /// "Latent (nearest)": `floor(dst * scale)`.
    Nearest,
    /// "Latent (nearest-exact)": `floor((dst + 0.5) * scale)`.
    NearestExact,
}

impl LatentUpscale {
    pub const ALL: [LatentUpscale; 6] = [
        Self::Bilinear,
        Self::BilinearAntialias,
        Self::Bicubic,
        Self::BicubicAntialias,
        Self::Nearest,
        Self::NearestExact,
    ];

    /// sdctl's names (`--hires-upscaler`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bilinear => "latent",
            Self::BilinearAntialias => "latent-antialiased",
            Self::Bicubic => "latent-bicubic",
            Self::BicubicAntialias => "latent-bicubic-antialiased",
            Self::Nearest => "latent-nearest",
            Self::NearestExact => "latent-nearest-exact",
        }
    }

    /// A1111's names (its infotext's "Hires upscaler").
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Bilinear => "Latent",
            Self::BilinearAntialias => "Latent (antialiased)",
            Self::Bicubic => "Latent (bicubic)",
            Self::BicubicAntialias => "Latent (bicubic antialiased)",
            Self::Nearest => "Latent (nearest)",
            Self::NearestExact => "Latent (nearest-exact)",
        }
    }
}

impl fmt::Display for LatentUpscale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LatentUpscale {
    type Err = String;
    /// Our names or A1111's, any case.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim().to_lowercase();
        Self::ALL
            .into_iter()
            .find(|m| m.name() == t || m.a1111_name().to_lowercase() == t)
            .ok_or_else(|| {
                format!(
                    "{s:?} is no latent upscaler: use {}",
                    Self::ALL.map(|m| m.name()).join(", ")
                )
            })
    }
}

/// Per output index: the input indices and weights along one axis.
type Taps = Vec<Vec<(usize, f32)>>;

/// `area_pixel_compute_scale` with no scale factor given: `input / output` in float.
fn scale(input: usize, output: usize) -> f32 {
    input as f32 / output as f32
}

/// ATen's `upsample_bilinear2d` source index (`area_pixel_compute_source_index`, clamped at 0)
/// and lambdas.
fn linear_taps(input: usize, output: usize) -> Taps {
    let s = scale(input, output);
    (0..output)
        .map(|d| {
            let src = ((d as f32 + 0.5) * s - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            let l1 = src - i0 as f32;
            vec![(i0, 1.0 - l1), (i1, l1)]
        })
        .collect()
}

/// ATen's `upsample_bicubic2d`: A = -0.75, four taps with indices clamped to the edges.
fn cubic_taps(input: usize, output: usize) -> Taps {
    let s = scale(input, output);
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    (0..output)
        .map(|d| {
            let real = (d as f32 + 0.5) * s - 0.5;
            let base = real.floor();
            let t = real - base;
            let w = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
            (0..4)
                .map(|k| {
                    let i = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
                    (i, w[k])
                })
                .collect()
        })
        .collect()
}

/// ATen's antialiased kernels (`_compute_indices_min_size_weights_aa`): the filter stretched by
/// the scale when downsampling, weights normalised over the taps inside the input.
fn aa_taps(input: usize, output: usize, cubic: bool) -> Taps {
    let s = scale(input, output);
    let interp = if cubic { 4.0 } else { 2.0 };
    let support = if s >= 1.0 {
        interp * 0.5 * s
    } else {
        interp * 0.5
    };
    let inv = if s >= 1.0 { 1.0 / s } else { 1.0 };
    let filter = |x: f32| {
        let x = x.abs();
        if cubic {
            const A: f32 = -0.5;
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        } else if x < 1.0 {
            1.0 - x
        } else {
            0.0
        }
    };
    (0..output)
        .map(|d| {
            let center = s * (d as f32 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut w: Vec<(usize, f32)> = (xmin..xmax)
                .map(|j| (j, filter((j as f32 - center + 0.5) * inv)))
                .collect();
            let total: f32 = w.iter().map(|(_, v)| v).sum();
            if total != 0.0 {
                w.iter_mut().for_each(|(_, v)| *v /= total);
            }
            w
        })
        .collect()
}

fn nearest_taps(input: usize, output: usize, exact: bool) -> Taps {
    let s = scale(input, output);
    (0..output)
        .map(|d| {
            let x = if exact { d as f32 + 0.5 } else { d as f32 };
            vec![(((x * s).floor() as usize).min(input - 1), 1.0)]
        })
        .collect()
}

fn taps(mode: LatentUpscale, input: usize, output: usize) -> Taps {
    match mode {
        LatentUpscale::Bilinear => linear_taps(input, output),
        LatentUpscale::Bicubic => cubic_taps(input, output),
        LatentUpscale::BilinearAntialias => aa_taps(input, output, false),
        LatentUpscale::BicubicAntialias => aa_taps(input, output, true),
        LatentUpscale::Nearest => nearest_taps(input, output, false),
        LatentUpscale::NearestExact => nearest_taps(input, output, true),
    }
}

/// Resize `[B, C, H, W]` latents to `height` x `width` (`F.interpolate(x, size=(height,
/// width), mode=..., antialias=...)`), in f32 on the CPU; the result goes back to `x`'s device
/// and dtype.
pub fn resize_latents(
    x: &Tensor,
    height: usize,
    width: usize,
    mode: LatentUpscale,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if height == 0 || width == 0 || h == 0 || w == 0 {
        candle_core::bail!("cannot resize {h}x{w} latents to {height}x{width}");
    }
    let ty = taps(mode, h, height);
    let tx = taps(mode, w, width);
    let src: Vec<f32> = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut out = vec![0f32; b * c * height * width];
    for plane in 0..b * c {
        let p = &src[plane * h * w..(plane + 1) * h * w];
        let o = &mut out[plane * height * width..(plane + 1) * height * width];
        for (oy, wy) in ty.iter().enumerate() {
            for (ox, wx) in tx.iter().enumerate() {
                let mut acc = 0f32;
                for &(iy, vy) in wy {
                    let row = &p[iy * w..(iy + 1) * w];
                    let mut r = 0f32;
                    for &(ix, vx) in wx {
                        r += vx * row[ix];
                    }
                    acc += vy * r;
                }
                o[oy * width + ox] = acc;
            }
        }
    }
    Tensor::from_vec(out, (b, c, height, width), &Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())
}
