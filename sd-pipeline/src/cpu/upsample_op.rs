//! Nearest-neighbour upsampling by an integer factor on the CPU in f32, with its backward (the
//! sum over each source pixel's block). candle 0.11 takes that backward as a grouped
//! convolution, which it runs as one convolution per channel (1280 of them in the UNet's
//! deepest upsampler).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv_op::{cpu_f32, f32_slice};

/// `[B, C, H, W]` -> `[B, C, H*s, W*s]`.
struct UpsampleNearest {
    scale: usize,
}

impl CustomOp1 for UpsampleNearest {
    fn name(&self) -> &'static str {
        "upsample-nearest"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = super::op_profile::span("upsample fwd");
        let x = f32_slice(st, l)?;
        let (b, c, h, w) = l.shape().dims4()?;
        let s = self.scale;
        let (oh, ow) = (h * s, w * s);
        let mut out = vec![0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for (y, row) in dst.chunks_exact_mut(ow).enumerate() {
                    let line = &src[y / s * w..][..w];
                    for (d, v) in row.chunks_exact_mut(s).zip(line) {
                        d.fill(*v);
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = super::op_profile::span("upsample bwd");
        let (b, c, h, w) = x.dims4()?;
        let s = self.scale;
        let (oh, ow) = (h * s, w * s);
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let g = cpu_f32(&gs, gl)?;
        let mut gx = vec![0f32; b * c * h * w];
        gx.par_chunks_mut(h * w)
            .zip(g.par_chunks(oh * ow))
            .for_each(|(dst, src)| {
                for (y, row) in src.chunks_exact(ow).enumerate() {
                    let line = &mut dst[y / s * w..][..w];
                    for (d, v) in line.iter_mut().zip(row.chunks_exact(s)) {
                        *d += v.iter().sum::<f32>();
                    }
                }
            });
        Ok(Some(Tensor::from_vec(gx, (b, c, h, w), x.device())?))
    }
}

/// `x.upsample_nearest2d(th, tw)`: this op for a CPU f32 input and an integer factor the same
/// on both axes, candle's otherwise.
pub fn upsample_nearest2d(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let cpu_f32 = super::serve(x.device()) && x.dtype() == candle_core::DType::F32;
    let integer = h > 0 && w > 0 && th.is_multiple_of(h) && tw.is_multiple_of(w);
    if cpu_f32 && integer && th / h == tw / w {
        x.contiguous()?.apply_op1(UpsampleNearest { scale: th / h })
    } else {
        x.upsample_nearest2d(th, tw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output and gradient equal candle's (copies and sums of 4 or 9 values: exact up to the
    /// order of the sums, 1e-6).
    #[test]
    fn matches_candles_upsampling_and_its_gradient() {
        let dev = Device::Cpu;
        for s in [2, 3] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev).unwrap()).unwrap();
            let ours = upsample_nearest2d(x.as_tensor(), 4 * s, 5 * s).unwrap();
            let theirs = x.as_tensor().upsample_nearest2d(4 * s, 5 * s).unwrap();
            let d = crate::cpu::max_diff;
            assert_eq!(d(&ours, &theirs), 0.0);
            let (g1, g2) = crate::cpu::weighted_grads(ours, theirs);
            let (a, b) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert!(d(a, b) < 1e-5, "scale {s}: {}", d(a, b));
        }
    }
}
