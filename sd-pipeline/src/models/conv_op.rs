//! A trainable 2-D convolution for the CPU. candle 0.11's own conv2d backward runs a naive
//! `conv_transpose2d` for the input gradient and a conv2d with the whole gradient map as its
//! kernel for the weight gradient, which makes training crawl; here the forward is candle's
//! conv2d and the backward recomputes `im2col` columns and takes both gradients as matmuls
//! (the input's through `col2im`). Used only when a gradient is tracked.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geo {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geo {
    fn new(dims: &[usize], k: usize, stride: usize, pad: usize) -> Result<Self> {
        let [b, c, h, w] = dims else {
            candle_core::bail!("im2col: expected a 4-d input, got {dims:?}")
        };
        let (b, c, h, w) = (*b, *c, *h, *w);
        if h + 2 * pad < k || w + 2 * pad < k {
            candle_core::bail!("im2col: kernel {k} larger than the padded input {h}x{w}");
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            k,
            stride,
            pad,
            oh: (h + 2 * pad - k) / stride + 1,
            ow: (w + 2 * pad - k) / stride + 1,
        })
    }
    /// Columns per output position: `c * k * k`, ordered (c, ky, kx) like the weight.
    fn cols(&self) -> usize {
        self.c * self.k * self.k
    }
    fn positions(&self) -> usize {
        self.oh * self.ow
    }
}

/// `[B, C, H, W]` -> `[B, C*K*K, OH*OW]` (rows ordered (c, ky, kx) like the weight).
struct Im2Col {
    k: usize,
    stride: usize,
    pad: usize,
}

/// `[B, C*K*K, OH*OW]` -> `[B, C, H, W]` (sums overlapping patches): im2col's adjoint.
struct Col2Im {
    geo: Geo,
}

/// The f32 values of a contiguous CPU tensor (the custom ops' inputs).
pub(super) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("custom CPU op: f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("custom CPU op: input is not contiguous"),
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geo::new(l.dims(), self.k, self.stride, self.pad)?;
        let x = f32_slice(s, l)?;
        let (n, p) = (g.cols(), g.positions());
        let mut out = vec![0f32; g.b * n * p];
        // one row of P positions per (batch, c, ky, kx): contiguous spans at stride 1
        out.par_chunks_mut(p).enumerate().for_each(|(row, dst)| {
            let (bi, r) = (row / n, row % n);
            let (c, ky, kx) = (r / (g.k * g.k), r / g.k % g.k, r % g.k);
            let src = &x[(bi * g.c + c) * g.h * g.w..][..g.h * g.w];
            for oy in 0..g.oh {
                let Some(y) = (oy * g.stride + ky).checked_sub(g.pad).filter(|&y| y < g.h) else {
                    continue;
                };
                let line = &src[y * g.w..(y + 1) * g.w];
                let d = &mut dst[oy * g.ow..(oy + 1) * g.ow];
                for (ox, v) in d.iter_mut().enumerate() {
                    if let Some(xx) = (ox * g.stride + kx)
                        .checked_sub(g.pad)
                        .filter(|&xx| xx < g.w)
                    {
                        *v = line[xx];
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.b, n, p))))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geo;
        let cols = f32_slice(s, l)?;
        let (n, p) = (g.cols(), g.positions());
        let mut out = vec![0f32; g.b * g.c * g.h * g.w];
        // one input channel plane per task: it gathers its k*k rows of columns
        out.par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(plane, dst)| {
                let (bi, c) = (plane / g.c, plane % g.c);
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let r = (c * g.k + ky) * g.k + kx;
                        let row = &cols[(bi * n + r) * p..][..p];
                        for oy in 0..g.oh {
                            let Some(y) =
                                (oy * g.stride + ky).checked_sub(g.pad).filter(|&y| y < g.h)
                            else {
                                continue;
                            };
                            for ox in 0..g.ow {
                                if let Some(xx) = (ox * g.stride + kx)
                                    .checked_sub(g.pad)
                                    .filter(|&xx| xx < g.w)
                                {
                                    dst[y * g.w + xx] += row[oy * g.ow + ox];
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.c, g.h, g.w))))
    }
}

/// The convolution as one op: forward is candle's conv2d (the inference path's numbers),
/// backward recomputes the columns from the input and takes both gradients as matmuls. Only
/// the input and the weight are kept for backward, as candle's own op does.
struct ConvTrain {
    stride: usize,
    pad: usize,
}

fn tensor_of(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    Tensor::from_slice(f32_slice(s, l)?, l.dims(), &candle_core::Device::Cpu)
}

impl CustomOp2 for ConvTrain {
    fn name(&self) -> &'static str {
        "conv2d-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = tensor_of(s1, l1)?.conv2d(&tensor_of(s2, l2)?, self.pad, self.stride, 1, 1)?;
        let y = y.contiguous()?;
        let (st, l) = y.storage_and_layout();
        let v = match &*st {
            Storage::Cpu(CpuStorage::F32(v)) => {
                v[l.start_offset()..][..l.shape().elem_count()].to_vec()
            }
            _ => candle_core::bail!("conv2d-train: unexpected storage"),
        };
        Ok((CpuStorage::F32(v), l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (o, c, k, _) = w.dims4()?;
        let geo = Geo::new(x.dims(), k, self.stride, self.pad)?;
        let b = geo.b;
        let cols = x.contiguous()?.apply_op1_no_bwd(&Im2Col {
            k,
            stride: self.stride,
            pad: self.pad,
        })?; // [B, N, P]
        let g = grad.contiguous()?.reshape((b, o, geo.positions()))?;
        let gw = g
            .matmul(&cols.transpose(1, 2)?)?
            .sum(0)?
            .reshape((o, c, k, k))?;
        let wm = w.reshape((o, c * k * k))?.t()?.contiguous()?; // [N, O]
        let gcols = wm.broadcast_matmul(&g)?.contiguous()?; // [B, N, P]
        let gx = gcols.apply_op1_no_bwd(&Col2Im { geo })?;
        Ok((Some(gx), Some(gw)))
    }
}

/// `conv2d(x, weight) + bias` (square kernel, no dilation or groups) with matmul gradients.
pub fn conv2d_train(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (o, c, k, k2) = weight.dims4()?;
    if k != k2 || x.dim(1)? != c {
        candle_core::bail!(
            "conv2d_train: weight {:?} for input {:?}",
            weight.dims(),
            x.dims()
        );
    }
    let y = x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        ConvTrain {
            stride,
            pad: padding,
        },
    )?;
    match bias {
        Some(bb) => y.broadcast_add(&bb.reshape((1, o, 1, 1))?),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candles_conv2d_and_its_gradients() {
        let dev = Device::Cpu;
        for (stride, pad, k, h, w) in [(1, 1, 3, 7, 6), (2, 1, 3, 8, 10), (1, 0, 1, 5, 4)] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, w), &dev).unwrap()).unwrap();
            let wt =
                Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, k, k), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1., 4, &dev).unwrap()).unwrap();
            let ours = conv2d_train(
                x.as_tensor(),
                wt.as_tensor(),
                Some(bias.as_tensor()),
                stride,
                pad,
            )
            .unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(wt.as_tensor(), pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.as_tensor().reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
            // gradients of sum(y * r) for a random r (candle's own backward fails on odd sizes
            // at stride 2, so the cases compared have even ones)
            let r = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &wt, &bias] {
                let a = g1.get(v.as_tensor()).unwrap();
                let b = g2.get(v.as_tensor()).unwrap();
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                assert!(
                    d.to_scalar::<f32>().unwrap() < 1e-4,
                    "stride {stride} pad {pad} k {k}"
                );
            }
        }
    }
}
