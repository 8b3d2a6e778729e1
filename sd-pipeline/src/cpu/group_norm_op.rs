//! GroupNorm (optionally followed by SiLU) as one CPU pass with its own backward. candle-nn's
//! GroupNorm is about ten full-tensor ops (sum, subtract, square, sum, divide, sqrt, divide,
//! multiply, add; SiLU two more) and as many allocations, on the UNet's largest activations.
//! Statistics are accumulated in f64; results agree with the op-by-op formula to f32 rounding.

use super::conv_op::f32_slice;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `silu(y) = y * sigmoid(y)`.
#[inline]
fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// `o = silu(x * a + b)`, vectorised ([`super::activation::sigmoid1`]: the exp within 2 ulp).
#[inline(always)]
fn affine_silu_body(o: &mut [f32], xs: &[f32], a: f32, b: f32) {
    for (o, &v) in o.iter_mut().zip(xs) {
        let y = v * a + b;
        *o = y * super::activation::sigmoid1(y);
    }
}

super::simd::simd_dispatch!(fn affine_silu(o: &mut [f32], xs: &[f32], a: f32, b: f32) -> () = affine_silu_body);

pub struct GroupNormOp {
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

struct Geo {
    b: usize,
    c: usize,
    hw: usize,
    cpg: usize,
}

impl GroupNormOp {
    fn geo(&self, dims: &[usize]) -> Result<Geo> {
        if dims.len() < 2 {
            candle_core::bail!("group norm: input {dims:?} has no channel dimension");
        }
        let (b, c) = (dims[0], dims[1]);
        if c % self.groups != 0 {
            candle_core::bail!("group norm: {c} channels in {} groups", self.groups);
        }
        Ok(Geo {
            b,
            c,
            hw: dims[2..].iter().product(),
            cpg: c / self.groups,
        })
    }

    /// Mean and 1/std of each (batch, group).
    fn stats(&self, x: &[f32], g: &Geo) -> Vec<(f32, f32)> {
        let n = g.cpg * g.hw;
        (0..g.b * self.groups)
            .into_par_iter()
            .map(|i| {
                let s = &x[i * n..(i + 1) * n];
                let mean = super::reduce::sum_f64(s) / n as f64;
                let var = super::reduce::sum_sq_dev_f64(s, mean) / n as f64;
                (mean as f32, (1.0 / (var + self.eps).sqrt()) as f32)
            })
            .collect()
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = super::op_profile::span("group norm fwd");
        let g = self.geo(l1.dims())?;
        let (x, gamma, beta) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let stats = self.stats(x, &g);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(g.hw)
            .zip(x.par_chunks(g.hw))
            .enumerate()
            .for_each(|(plane, (o, xs))| {
                let (bi, ch) = (plane / g.c, plane % g.c);
                let (mean, rstd) = stats[bi * self.groups + ch / g.cpg];
                let (a, b) = (gamma[ch] * rstd, beta[ch] - gamma[ch] * rstd * mean);
                if self.silu {
                    affine_silu(o, xs, a, b);
                } else {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        *o = v * a + b;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = super::op_profile::span("group norm bwd");
        let g = self.geo(x.dims())?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let gv = gamma.flatten_all()?.to_vec1::<f32>()?;
        let beta = _beta.flatten_all()?.to_vec1::<f32>()?;
        let dout = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let stats = self.stats(&xv, &g);
        let n = g.cpg * g.hw;
        // per (batch, group): dy (through SiLU), xhat; then per-channel sums and dx
        let per_group: Vec<(Vec<f32>, Vec<f64>, Vec<f64>)> = (0..g.b * self.groups)
            .into_par_iter()
            .map(|i| {
                let (mean, rstd) = stats[i];
                let (bi, gi) = (i / self.groups, i % self.groups);
                let mut dx = vec![0f32; n];
                let mut dgamma = vec![0f64; g.cpg];
                let mut dbeta = vec![0f64; g.cpg];
                let mut dxhat = vec![0f32; n];
                let mut xhat = vec![0f32; n];
                let (mut s1, mut s2) = (0f64, 0f64);
                for cc in 0..g.cpg {
                    let ch = gi * g.cpg + cc;
                    let base = (bi * g.c + ch) * g.hw;
                    for p in 0..g.hw {
                        let k = cc * g.hw + p;
                        let xh = (xv[base + p] - mean) * rstd;
                        let mut dy = dout[base + p];
                        if self.silu {
                            let y = xh * gv[ch] + beta[ch];
                            let s = sigmoid(y);
                            dy *= s * (1.0 + y * (1.0 - s));
                        }
                        dgamma[cc] += (dy * xh) as f64;
                        dbeta[cc] += dy as f64;
                        let d = dy * gv[ch];
                        dxhat[k] = d;
                        xhat[k] = xh;
                        s1 += d as f64;
                        s2 += (d * xh) as f64;
                    }
                }
                let (m1, m2) = ((s1 / n as f64) as f32, (s2 / n as f64) as f32);
                for k in 0..n {
                    dx[k] = rstd * (dxhat[k] - m1 - xhat[k] * m2);
                }
                (dx, dgamma, dbeta)
            })
            .collect();
        let mut dx = vec![0f32; xv.len()];
        let mut dgamma = vec![0f64; g.c];
        let mut dbeta = vec![0f64; g.c];
        for (i, (d, dg, db)) in per_group.into_iter().enumerate() {
            let (bi, gi) = (i / self.groups, i % self.groups);
            let start = (bi * g.c + gi * g.cpg) * g.hw;
            dx[start..start + n].copy_from_slice(&d);
            for cc in 0..g.cpg {
                dgamma[gi * g.cpg + cc] += dg[cc];
                dbeta[gi * g.cpg + cc] += db[cc];
            }
        }
        let dev = x.device();
        let to = |v: Vec<f64>| -> Result<Tensor> {
            Tensor::from_vec(
                v.into_iter().map(|f| f as f32).collect::<Vec<_>>(),
                gamma.dims(),
                dev,
            )
        };
        // a frozen norm's affine parameters (the UNet's) get no gradient
        let affine = gamma.track_op() || _beta.track_op();
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            affine.then(|| to(dgamma)).transpose()?,
            affine.then(|| to(dbeta)).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Var};

    #[test]
    fn matches_candle_nn_group_norm_with_and_without_silu_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &((Tensor::randn(0f32, 1., (2, 6, 5, 3), &dev).unwrap() * 3.0).unwrap() + 1.0).unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 6, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 6, &dev).unwrap()).unwrap();
        let reference =
            candle_nn::GroupNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 6, 3, 1e-5)
                .unwrap();
        for silu in [false, true] {
            let op = GroupNormOp {
                groups: 3,
                eps: 1e-5,
                silu,
            };
            let ours = x
                .as_tensor()
                .apply_op3(w.as_tensor(), b.as_tensor(), op)
                .unwrap();
            let mut theirs = reference.forward(x.as_tensor()).unwrap();
            if silu {
                theirs = theirs.silu().unwrap();
            }
            let d = (&ours - &theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "forward silu={silu}: {d}");
            let r = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w, &b] {
                let a = g1.get(v.as_tensor()).unwrap();
                let c = g2.get(v.as_tensor()).unwrap();
                let d = (a - c)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(d < 1e-4, "gradient silu={silu}: {d}");
            }
        }
    }
}
