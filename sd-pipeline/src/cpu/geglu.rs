//! GEGLU (`a * gelu(b)` over the two halves of the last dimension, exact erf GELU as diffusers)
//! in one vectorised CPU pass in f32, and its gradient in another: candle's path makes two strided copies for
//! the halves, runs libm's scalar `erff` per element and a third pass for the product.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv_op::f32_slice;

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = super::op_profile::span("geglu fwd");
        let h = f32_slice(s, l)?;
        let dims = l.dims();
        let Some((&last, lead)) = dims.split_last() else {
            candle_core::bail!("geglu: a scalar has no halves")
        };
        if last % 2 != 0 {
            candle_core::bail!("geglu: last dimension {last} is odd");
        }
        let inner = last / 2;
        let mut out = vec![0f32; h.len() / 2];
        out.par_chunks_mut(inner)
            .zip(h.par_chunks(last))
            .for_each(|(o, row)| geglu_row(&row[..inner], &row[inner..], o));
        let mut shape = lead.to_vec();
        shape.push(inner);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    /// `d/da = gelu(b)`, `d/db = a * (Phi(b) + b * phi(b))` (the exact GELU's derivative).
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = super::op_profile::span("geglu bwd");
        let last = x.dims().last().copied().unwrap_or(0);
        let inner = last / 2;
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (h, g) = (
            super::conv_op::cpu_f32(&xs, xl)?,
            super::conv_op::cpu_f32(&gs, gl)?,
        );
        let mut gx = vec![0f32; h.len()];
        gx.par_chunks_mut(last.max(1))
            .zip(h.par_chunks(last.max(1)))
            .zip(g.par_chunks(inner.max(1)))
            .for_each(|((d, row), g)| {
                let (da, db) = d.split_at_mut(inner);
                geglu_grad_row(&row[..inner], &row[inner..], g, da, db)
            });
        Ok(Some(Tensor::from_vec(gx, x.dims(), x.device())?))
    }
}

/// `x[..., :n] * gelu_erf(x[..., n:])` for `x` of last dimension `2n`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let cpu_f32 = super::serve(x.device()) && x.dtype() == candle_core::DType::F32;
    if cpu_f32 && !x.track_op() {
        return x.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    if cpu_f32 {
        return x.contiguous()?.apply_op1(Geglu);
    }
    let last = x
        .rank()
        .checked_sub(1)
        .ok_or_else(|| candle_core::Error::Msg("geglu: a scalar has no halves".into()))?;
    let inner = x.dim(last)? / 2;
    x.narrow(last, 0, inner)? * x.narrow(last, inner, inner)?.gelu_erf()?
}

super::simd::simd_dispatch! {
    fn geglu_row(a: &[f32], b: &[f32], out: &mut [f32]) -> () = geglu_plain
}

super::simd::simd_dispatch! {
    fn geglu_grad_row(a: &[f32], b: &[f32], g: &[f32], da: &mut [f32], db: &mut [f32]) -> () = geglu_grad_plain
}

#[inline(always)]
fn geglu_grad_plain(a: &[f32], b: &[f32], g: &[f32], da: &mut [f32], db: &mut [f32]) {
    // 1 / sqrt(2 pi)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for ((((&a, &b), &g), da), db) in a.iter().zip(b).zip(g).zip(da).zip(db) {
        let cdf = 0.5 * (1.0 + erf(b * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * (-0.5 * b * b).exp();
        *da = g * b * cdf;
        *db = g * a * (cdf + b * pdf);
    }
}

#[inline(always)]
fn geglu_plain(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a * 0.5 * b * (1.0 + erf(b * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// erf for f32 as a rational function on [-4, 4] (Eigen's `generic_fast_erf_float`), +-1
/// beyond; within 1e-6 of libm's `erff` (tested). Branch-free, so it vectorises.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10_f32;
    let p = p.mul_add(x2, 2.770_681_4e-8);
    let p = p.mul_add(x2, -2.101_024e-6);
    let p = p.mul_add(x2, -5.692_506_4e-5);
    let p = p.mul_add(x2, -7.349_906_3e-4);
    let p = p.mul_add(x2, -2.954_600_1e-3);
    let p = p.mul_add(x2, -1.609_603_3e-2);
    let q = -1.456_607_2e-5_f32;
    let q = q.mul_add(x2, -2.133_740_6e-4);
    let q = q.mul_add(x2, -1.682_827e-3);
    let q = q.mul_add(x2, -7.373_329e-3);
    let q = q.mul_add(x2, -1.426_474e-2);
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn erf_matches_libm() {
        let mut worst = 0f32;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.0;
            worst = worst.max((erf(x) - libm_erf(x)).abs());
        }
        assert!(worst < 1e-6, "max abs error {worst}");
    }

    fn libm_erf(x: f32) -> f32 {
        // candle's own gelu_erf goes through this crate's erff; compare with f64 for truth
        let x = x as f64;
        // Abramowitz-Stegun would be too coarse: integrate exp(-t^2) with Simpson's rule
        let n = 2000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for k in 1..n {
            s += f(k as f64 * h) * if k % 2 == 1 { 4.0 } else { 2.0 };
        }
        (s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()) as f32
    }

    #[test]
    fn matches_candles_formula() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1., (2, 7, 2 * 19), &dev).unwrap() * 3.0).unwrap();
        let ours = geglu(&x).unwrap();
        let theirs = (x.narrow(2, 0, 19).unwrap()
            * x.narrow(2, 19, 19).unwrap().gelu_erf().unwrap())
        .unwrap();
        assert_eq!(ours.dims(), &[2, 7, 19]);
        let d = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        // values up to ~100 (3-sigma products of 3-sigma inputs): a few f32 epsilons of those
        assert!(d.to_scalar::<f32>().unwrap() < 2e-5);
        assert!(geglu(
            &Tensor::zeros((2, 3), candle_core::DType::F32, &dev)
                .unwrap()
                .narrow(1, 0, 3)
                .unwrap()
        )
        .is_err());
    }

    /// The tracked op's gradient equals candle's formula's (erf within 1e-6 of libm, values of
    /// order 10: 1e-4).
    #[test]
    fn gradient_matches_candles_formula() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &(Tensor::randn(0f32, 1., (2, 7, 2 * 19), &dev).unwrap() * 2.0).unwrap(),
        )
        .unwrap();
        let ours = geglu(x.as_tensor()).unwrap();
        let xt = x.as_tensor();
        let theirs = (xt.narrow(2, 0, 19).unwrap()
            * xt.narrow(2, 19, 19).unwrap().gelu_erf().unwrap())
        .unwrap();
        let (g1, g2) = crate::cpu::weighted_grads(ours, theirs);
        let d = (g1.get(xt).unwrap() - g2.get(xt).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
    }
}
