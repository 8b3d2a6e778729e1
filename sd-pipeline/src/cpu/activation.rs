//! Elementwise sigmoid, SiLU (`x * sigmoid(x)`) and exact GELU over f32 slices, vectorised (the exp is
//! [`exp_approx`], always of a non-positive argument) and split over the cores. The annotator
//! networks' ONNX graphs spend a fifth of their time in these two as separate candle ops.

use super::fused_attention::exp_approx;
use super::geglu::erf;
use super::simd::simd_dispatch;
use candle_core::{Result, Tensor};

/// sigmoid(x) = 1 / (1 + e^-x), through e^-|x| so the exponent never overflows.
#[inline(always)]
pub(super) fn sigmoid1(x: f32) -> f32 {
    let e = exp_approx(-x.abs());
    let r = 1.0 / (1.0 + e);
    if x >= 0.0 {
        r
    } else {
        e * r
    }
}

#[inline(always)]
fn sigmoid_body(v: &mut [f32]) {
    for x in v {
        *x = sigmoid1(*x);
    }
}

#[inline(always)]
fn silu_body(v: &mut [f32]) {
    for x in v {
        *x *= sigmoid1(*x);
    }
}

#[inline(always)]
fn gelu_body(v: &mut [f32]) {
    for x in v {
        let y = *x * std::f32::consts::FRAC_1_SQRT_2;
        // erf rounds to +-1 in f32 from |y| = 3.9 on (the polynomial is clamped, not exact)
        let e = if y.abs() >= 3.9 {
            1f32.copysign(y)
        } else {
            erf(y)
        };
        *x = 0.5 * *x * (1.0 + e);
    }
}

simd_dispatch!(fn sigmoid_run(v: &mut [f32]) -> () = sigmoid_body);
simd_dispatch!(fn gelu_run(v: &mut [f32]) -> () = gelu_body);
simd_dispatch!(fn silu_run(v: &mut [f32]) -> () = silu_body);

/// Elements below which one thread does the whole slice.
const PER_THREAD: usize = 1 << 16;

fn split(v: &mut [f32], f: fn(&mut [f32])) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = threads.min(v.len() / PER_THREAD).max(1);
    if n == 1 {
        return f(v);
    }
    let per = v.len().div_ceil(n);
    std::thread::scope(|s| {
        let mut parts = v.chunks_mut(per);
        let first = parts.next();
        for p in parts {
            s.spawn(move || f(p));
        }
        if let Some(p) = first {
            f(p);
        }
    });
}

/// `v[i] = sigmoid(v[i])` (within 4e-7 relative of `1 / (1 + exp(-x))`, 2e-36 absolute below
/// -87; NaN stays NaN).
pub fn sigmoid_inplace(v: &mut [f32]) {
    split(v, sigmoid_run)
}

/// `v[i] = gelu(v[i])`, the exact (erf) GELU, with [`super::geglu`]'s rational erf (within
/// 1e-6 of libm's).
pub fn gelu_erf_inplace(v: &mut [f32]) {
    split(v, gelu_run)
}

/// `f` on a copy of an f32 tensor's values, as a tensor of its shape.
fn map(t: &Tensor, f: fn(&mut [f32])) -> Result<Tensor> {
    let mut v = t.flatten_all()?.to_vec1::<f32>()?;
    f(&mut v);
    Tensor::from_vec(v, t.dims(), t.device())
}

/// The exact GELU of an f32 CPU tensor, vectorised (candle's `gelu_erf` calls libm per value).
pub fn gelu_erf(t: &Tensor) -> Result<Tensor> {
    map(t, gelu_erf_inplace)
}

/// The sigmoid of an f32 CPU tensor ([`sigmoid_inplace`]).
pub fn sigmoid(t: &Tensor) -> Result<Tensor> {
    map(t, sigmoid_inplace)
}

/// `x * sigmoid(x)` of an f32 CPU tensor ([`silu_inplace`]).
pub fn silu(t: &Tensor) -> Result<Tensor> {
    map(t, silu_inplace)
}

/// `v[i] = v[i] * sigmoid(v[i])`.
pub fn silu_inplace(v: &mut [f32]) {
    split(v, silu_run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_and_silu_match_the_formula() {
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.05).collect();
        let (mut s, mut l) = (xs.clone(), xs.clone());
        sigmoid_inplace(&mut s);
        silu_inplace(&mut l);
        for ((x, s), l) in xs.iter().zip(&s).zip(&l) {
            // below -87 the exp is held at e^-87 (~1.6e-38): absolute error only
            let want = 1.0 / (1.0 + (-*x as f64).exp());
            let tol = |w: f64| 4e-7 * w.abs() + 2e-36;
            assert!(
                (*s as f64 - want).abs() <= tol(want),
                "sigmoid({x}) = {s}, not {want}"
            );
            let want = *x as f64 * want;
            assert!(
                (*l as f64 - want).abs() <= tol(want),
                "silu({x}) = {l}, not {want}"
            );
        }
        // the exact GELU against candle's (libm erff per value)
        let t =
            candle_core::Tensor::from_vec(xs.clone(), xs.len(), &candle_core::Device::Cpu).unwrap();
        let want = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        let got = gelu_erf(&t).unwrap().to_vec1::<f32>().unwrap();
        for ((x, g), w) in xs.iter().zip(&got).zip(&want) {
            assert!(
                (g - w).abs() <= 2e-6 * w.abs().max(1.0),
                "gelu({x}): {g} vs {w}"
            );
        }
        let mut big = vec![1e30f32, -1e30, f32::NAN];
        sigmoid_inplace(&mut big);
        assert_eq!(big[0], 1.0);
        assert!(big[1] < 2e-38);
        assert!(big[2].is_nan());
    }
}
