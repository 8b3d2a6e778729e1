//! Layer norm over the last dimension on the CPU in f32 with its backward, for training (the
//! inference path keeps candle's fused op). candle's differentiable formula runs a dozen
//! tensor ops each way, each allocating.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv_op::{cpu_f32, f32_slice};

struct LayerNormOp {
    eps: f32,
}

/// A row's mean and 1 / sqrt(biased variance + eps), summed in f64.
fn stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len().max(1) as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = super::op_profile::span("layer norm fwd");
        let (x, w, b) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?, f32_slice(bs, bl)?);
        let n = xl.dims().last().copied().unwrap_or(0);
        if n == 0 || w.len() != n || b.len() != n {
            candle_core::bail!(
                "layer norm: input {:?}, weight {:?}, bias {:?}",
                xl.dims(),
                wl.dims(),
                bl.dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, row)| {
                let (mean, rstd) = stats(row, self.eps);
                for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(w).zip(b) {
                    *o = (v - mean) * rstd * w + b;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = super::op_profile::span("layer norm bwd");
        let n = w.elem_count();
        let affine = w.track_op() || b.track_op();
        let (x, w, grad) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (xv, wv, gv) = (cpu_f32(&xs, xl)?, cpu_f32(&ws, wl)?, cpu_f32(&gs, gl)?);
        let row_stats: Vec<(f32, f32)> = xv.par_chunks(n).map(|r| stats(r, self.eps)).collect();
        let mut dx = vec![0f32; xv.len()];
        // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = g * w
        dx.par_chunks_mut(n)
            .zip(xv.par_chunks(n).zip(gv.par_chunks(n)))
            .zip(row_stats.par_iter())
            .for_each(|((d, (row, g)), &(mean, rstd))| {
                let (mut s1, mut s2) = (0f64, 0f64);
                for ((&v, &g), &w) in row.iter().zip(g).zip(wv) {
                    let dxh = (g * w) as f64;
                    s1 += dxh;
                    s2 += dxh * ((v - mean) * rstd) as f64;
                }
                let (m1, m2) = ((s1 / n as f64) as f32, (s2 / n as f64) as f32);
                for (((d, &v), &g), &w) in d.iter_mut().zip(row).zip(g).zip(wv) {
                    let xh = (v - mean) * rstd;
                    *d = rstd * (g * w - m1 - xh * m2);
                }
            });
        let dev = x.device();
        let (dw, db) = if affine {
            // per-row partial sums of g * xhat and g, reduced in f64
            let (dw, db) = xv
                .par_chunks(n)
                .zip(gv.par_chunks(n))
                .zip(row_stats.par_iter())
                .fold(
                    || (vec![0f64; n], vec![0f64; n]),
                    |(mut dw, mut db), ((row, g), &(mean, rstd))| {
                        for (((dw, db), &v), &g) in dw.iter_mut().zip(db.iter_mut()).zip(row).zip(g)
                        {
                            *dw += (g * (v - mean) * rstd) as f64;
                            *db += g as f64;
                        }
                        (dw, db)
                    },
                )
                .reduce(
                    || (vec![0f64; n], vec![0f64; n]),
                    |(mut a, mut b), (c, d)| {
                        a.iter_mut().zip(c).for_each(|(a, c)| *a += c);
                        b.iter_mut().zip(d).for_each(|(b, d)| *b += d);
                        (a, b)
                    },
                );
            let to = |v: Vec<f64>| {
                Tensor::from_vec(v.into_iter().map(|f| f as f32).collect::<Vec<_>>(), n, dev)
            };
            (Some(to(dw)?), Some(to(db)?))
        } else {
            (None, None)
        };
        Ok((Some(Tensor::from_vec(dx, x.dims(), dev)?), dw, db))
    }
}

/// Layer norm of `x` over its last dimension with a gradient (CPU, f32).
pub fn layer_norm_train(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Output and every gradient equal candle's differentiable formula's (rows of 24 values
    /// around 1: 1e-5); frozen weight and bias get no gradient.
    #[test]
    fn matches_candles_layer_norm_and_its_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2., (3, 5, 24), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 24, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 24, &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1., (3, 5, 24), &dev).unwrap();
        let ours = layer_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let theirs =
            candle_nn::ops::layer_norm_slow(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
                .unwrap();
        let d = crate::cpu::max_diff;
        assert!(d(&ours, &theirs) < 1e-5);
        // one r for both and for the frozen case below
        let grads = |y: Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads(ours), grads(theirs));
        for v in [&x, &w, &b] {
            let (a, e) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d(a, e) < 1e-4, "{}", d(a, e));
        }
        let (wf, bf) = (w.as_tensor().detach(), b.as_tensor().detach());
        let y = layer_norm_train(x.as_tensor(), &wf, &bf, 1e-5).unwrap();
        let g = grads(y);
        assert!(g.get(&wf).is_none() && g.get(&bf).is_none());
        let (a, e) = (
            g.get(x.as_tensor()).unwrap(),
            g1.get(x.as_tensor()).unwrap(),
        );
        assert!(d(a, e) < 1e-5);
    }
}
