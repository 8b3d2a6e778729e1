//! f64 sums of f32 slices for normalisation statistics, in eight running sums (one dependent
//! add per element would leave the adder waiting on itself), vectorised.

use super::simd::simd_dispatch;

#[inline(always)]
fn sum_dev_body(v: &[f32], center: f64, square: bool) -> f64 {
    let mut acc = [0f64; 8];
    let term = |x: f32| {
        let d = x as f64 - center;
        if square {
            d * d
        } else {
            d
        }
    };
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += term(x);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| term(x)).sum();
    acc.iter().sum::<f64>() + tail
}

simd_dispatch!(fn sum_dev(v: &[f32], center: f64, square: bool) -> f64 = sum_dev_body);

/// `sum(v)` in f64.
pub fn sum_f64(v: &[f32]) -> f64 {
    sum_dev(v, 0.0, false)
}

/// `sum((v - mean)^2)` in f64.
pub fn sum_sq_dev_f64(v: &[f32], mean: f64) -> f64 {
    sum_dev(v, mean, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_match_a_serial_f64_loop() {
        for n in [0, 1, 7, 8, 9, 1000, 4099] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
                .collect();
            let s: f64 = v.iter().map(|&x| x as f64).sum();
            let mean = if n > 0 { s / n as f64 } else { 0.0 };
            let q: f64 = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum();
            assert!((sum_f64(&v) - s).abs() <= 1e-9 * s.abs().max(1.0), "{n}");
            assert!(
                (sum_sq_dev_f64(&v, mean) - q).abs() <= 1e-9 * q.max(1.0),
                "{n}"
            );
        }
    }
}
